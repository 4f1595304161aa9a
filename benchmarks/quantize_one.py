"""Quantize with lowbit in a child process, so the harness measures its wall time and peak RSS alone.

Usage: python quantize_one.py MODEL_DIR CONFIG OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from lowbit.quant.methods import parse_config
from lowbit.quant.pipeline import quantize_checkpoint

if __name__ == "__main__":
    model, config, out = sys.argv[1:4]
    quantize_checkpoint(Path(model), parse_config(config), Path(out), overwrite=True)
