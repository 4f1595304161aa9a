"""Quantize with lowbit in a child process, so the harness measures its wall time and peak RSS alone.

Usage: python quantize_one.py MODEL_DIR CONFIG OUT_DIR [CALIB_TOKENS.npy]
CALIB_TOKENS.npy is an int64 [samples, seqlen] matrix, the same one given to every peer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from lowbit.calib.dataset import CalibSet
from lowbit.quant.methods import parse_config
from lowbit.quant.pipeline import quantize_checkpoint

if __name__ == "__main__":
    model, config, out = sys.argv[1:4]
    calib = None
    if len(sys.argv) > 4:
        tokens = torch.from_numpy(np.load(sys.argv[4]).astype(np.int64))
        calib = CalibSet(tokens, {"file": Path(sys.argv[4]).name, "samples": tokens.shape[0],
                                  "seqlen": tokens.shape[1]})
    quantize_checkpoint(Path(model), parse_config(config), Path(out), overwrite=True, calib=calib)
