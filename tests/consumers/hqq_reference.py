"""Run in benchmarks/.venvs/hqq: quantize each tensor of IN with hqq's Quantizer, write codes, scale, zero to OUT.

    python hqq_reference.py IN.safetensors OUT.safetensors BITS GROUP
"""

import sys

import torch
from hqq.core.quantize import Quantizer
from safetensors.torch import load_file, save_file

src, dst, bits, group = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = {}
for name, w in load_file(src).items():
    W_q, meta = Quantizer.quantize(w, nbits=bits, group_size=group, optimize=True, round_zero=False, axis=1,
                                   bitpack=False, compute_dtype=torch.float32, device="cpu")
    out[f"{name}.codes"] = W_q.float().contiguous()
    out[f"{name}.scale"] = meta["scale"].float().contiguous()
    out[f"{name}.zero"] = meta["zero"].float().contiguous()
save_file(out, dst)
