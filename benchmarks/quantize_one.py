"""Quantize with lowbit in a child process, so the harness measures its wall time and peak RSS alone.

Usage: python quantize_one.py MODEL_DIR CONFIG OUT [CALIB_TOKENS.npy] [IMATRIX]
CONFIG is a lowbit config string (rtn:4:128, gptq:4:128:act, ...) written as a lowbit checkpoint
folder, or gguf:TYPE:METHOD (gguf:Q4_K_M:gptq) written as a GGUF file, or bnb:nf4|int8[:rtn|gptq[:act]] written as a
bitsandbytes folder.
A lowbit checkpoint run also writes OUT.seconds.json: {"quantize_s": the pipeline's own wall time}.
CALIB_TOKENS.npy is an int64 [samples, seqlen] matrix, the same one given to every peer ('-' for none).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from lowbit.calib.dataset import CalibSet
from lowbit.formats.imatrix import read_imatrix
from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf
from lowbit.quant.methods import parse_config
from lowbit.quant.pipeline import quantize_checkpoint

if __name__ == "__main__":
    model, config, out = sys.argv[1:4]
    calib = None
    if len(sys.argv) > 4 and sys.argv[4] != "-":
        tokens = torch.from_numpy(np.load(sys.argv[4]).astype(np.int64))
        calib = CalibSet(tokens, {"file": Path(sys.argv[4]).name, "samples": tokens.shape[0],
                                  "seqlen": tokens.shape[1]})
    if config.startswith("gguf:"):
        _, file_type, method = config.split(":")
        imatrix = read_imatrix(Path(sys.argv[5])) if len(sys.argv) > 5 else None
        quantize_to_gguf(Path(model), GGUFConfig(file_type, method), Path(out), overwrite=True,
                         calib=calib if method != "rtn" else None, imatrix=imatrix)
    elif config.startswith("bnb:"):  # bnb:nf4|int8[:rtn|gptq[:act]]
        from lowbit.quant.bnb_pipeline import BnbConfig, quantize_to_bnb

        parts = config.split(":") + ["rtn"]
        quantize_to_bnb(Path(model), BnbConfig(parts[1], parts[2], "act" in parts[3:]), Path(out), overwrite=True,  # noqa: E501
                        calib=calib if parts[2] != "rtn" else None)
    else:
        stats = quantize_checkpoint(Path(model), parse_config(config), Path(out), overwrite=True, calib=calib)
        # the run's own clock (read layers, quantize, write), beside the harness's whole-process wall
        Path(f"{out}.seconds.json").write_text(json.dumps({"quantize_s": round(stats.seconds, 2)}))
