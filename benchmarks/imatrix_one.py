"""lowbit's importance-matrix pass in a child process (timed by the harness).

Usage: python imatrix_one.py MODEL_DIR CALIB_TOKENS.npy OUT.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from lowbit.calib.dataset import CalibSet
from lowbit.calib.imatrix import compute_imatrix
from lowbit.formats.imatrix import write_imatrix_gguf

if __name__ == "__main__":
    model, tokens_npy, out = sys.argv[1:4]
    tokens = torch.from_numpy(np.load(tokens_npy).astype(np.int64))
    calib = CalibSet(tokens, {"file": Path(tokens_npy).name, "samples": tokens.shape[0], "seqlen": tokens.shape[1]})
    im = compute_imatrix(Path(model), calib)
    write_imatrix_gguf(Path(out), im, [Path(tokens_npy).name], tokens.shape[0], tokens.shape[1])
