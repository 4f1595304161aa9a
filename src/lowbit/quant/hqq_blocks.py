"""HQQ in llama.cpp's Q4_1 / Q5_1 blocks: the half-quadratic solver's (scale, zero) in a plain GGUF.

HQQ fits, without calibration, a scale s and a float zero z per group so that w ~ s * (q - z). Q4_1 and
Q5_1 store exactly such a pair per 32 weights: fp16 d = s and fp16 m = -s * z (value d * q + m). So
lowbit's solver (lowbit.quant.hqq.solve, float zero, the type's bits, groups of 32) gives the header,
and each code is the nearest one under the stored header (where it differs from HQQ's own code, only
by the fp16 rounding of m). llama.cpp fills these types from each block's min and max; on Gaussian
weights HQQ's pair has 0.89x that squared error at both widths (tests/test_hqq_gguf.py).

Only these two: the symmetric types (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K) and the i-quants have no zero to
solve, and in Q4_K / Q5_K the pair becomes 6-bit multiples of two super-block scales, where HQQ's
(solved for float headers) measured 1.05-1.10x llama.cpp's own weighted search in squared error on the
same weights: no grid to hold it. Their tensors keep llama.cpp's search (lowbit.quant.gguf_pipeline).

The solver runs all its iterations (no early stop on the tensor's total error): each block's result
then depends on its own 32 weights only, so row chunks (the CPU workers') and whole tensors (a GPU)
write the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.quant import hqq
from lowbit.quant.ggml_blocks import BlockType, to_fp16
from lowbit.quant.grid import GridConfig

TYPES = ("Q4_1", "Q5_1")
SOLVER = hqq.HQQConfig(tol=-1.0)  # never stop early: see the module docstring


def supports(btype: BlockType) -> bool:
    return btype.name in TYPES


def fit(btype: BlockType, w: np.ndarray, hcfg: hqq.HQQConfig = SOLVER) -> dict[str, np.ndarray]:
    """Q4_1 / Q5_1 header params {d, m} [rows, n // 32] for w [rows, n] from HQQ's solve."""
    if not supports(btype):
        raise ValueError(f"{btype.name} cannot hold HQQ's (scale, zero); supported: {', '.join(TYPES)}")
    rows, n = w.shape
    grid = GridConfig(btype.bits, btype.block, symmetric=False, float_zero=True)
    g = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(rows, n // btype.block, btype.block)
    s, z = hqq.solve(g, None, grid, hcfg)
    return {"d": to_fp16(s.numpy()), "m": to_fp16((-s * z).numpy())}


def quantize(btype: BlockType, w: np.ndarray, hcfg: hqq.HQQConfig = SOLVER) -> np.ndarray:
    """The GGUF rows of w [rows, n] as `btype` with HQQ's headers and the nearest codes under them."""
    w = np.asarray(w, dtype=np.float32)
    params = fit(btype, w, hcfg)
    return btype.pack(params, btype.codes(w, params))
