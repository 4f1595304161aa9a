"""GPTQ targeting llama.cpp's block grids (Q8_0 ... Q6_K, IQ4_NL, IQ4_XS), so the result is a standard GGUF.

llama.cpp's quantizer (with or without an importance matrix) rounds every
weight on its own: the best per-block scales, then nearest codes. GPTQ instead
quantizes one input column at a time and pushes each column's rounding error
onto the columns not yet quantized through the inverse Hessian, so the layer's
*output* error is minimised, not each weight's. Nothing in that needs lowbit's
own grid: each block type exposes an effective per-sub-block (scale, bias) with
dequant = scale * (code - zero) + bias (or scale * level[code] + bias on the
i-quants' non-linear grid), which is all the column loop rounds to.

How a block's parameters are fitted, in column order:
  * default: when the loop reaches the first column of a block (32 or 256
    columns), the type's own search (llama.cpp's, imatrix-weighted by the
    Hessian diagonal) fits that block on the weights as *updated so far*;
  * act-order: every block is fitted up front on the original weights (static
    groups), then columns are visited by descending Hessian diagonal. Block
    membership stays positional, so the file needs no g_idx.
The fitted parameters and the codes are packed with the type's own `pack`, and
the returned dequantization is read back from those bytes, so what the
pipeline propagates is exactly what llama.cpp will compute with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.quant.ggml_blocks import BlockType
from lowbit.quant.gptq import GPTQConfig, _column_order, _handle_dead_columns, _hessian_of, _inverse_cholesky_upper
from lowbit.runtime import single_thread


@dataclass
class BlockResult:
    """One tensor on a ggml block type: its raw GGUF rows and their exact dequantization."""

    qtype: str
    raw: np.ndarray  # uint8 [rows, bytes_per_row]
    dequantized: torch.Tensor  # float32 [rows, cols]


@dataclass
class FactoredHessian:
    """What the column loop needs from one input group's Hessian, computed once for all its linears."""

    U: torch.Tensor  # upper Cholesky factor of (H + damp)^-1 in column-visit order, float32
    perm: torch.Tensor  # column-visit order
    dead: torch.Tensor  # bool [in]: inputs that never fire
    diag: np.ndarray  # float32 [in]: diag(H) in original column order, the fit's importance


def factor_hessian(stats: object, n_in: int, name: str, gptq: GPTQConfig) -> FactoredHessian:
    H = _hessian_of(stats, n_in, name).clone()
    dead = torch.diagonal(H) == 0
    _handle_dead_columns(H, torch.zeros(0, n_in, device=H.device))
    diag = torch.diagonal(H).float().cpu().numpy().copy()
    perm = _column_order(H, gptq.act_order)
    H = H[perm][:, perm]
    return FactoredHessian(_inverse_cholesky_upper(H, gptq, name), perm, dead, diag)


def quantize_block_gptq(weight: torch.Tensor, fh: FactoredHessian, btype: BlockType,
                        importance: np.ndarray | None = None, gptq: GPTQConfig = GPTQConfig()) -> BlockResult:
    """GPTQ one [out, in] weight onto `btype`; `importance` (an imatrix row) overrides diag(H) for the fits."""
    W = weight.detach().to(torch.float32).clone()
    W[:, fh.dead.to(W.device)] = 0.0
    imp = fh.diag if importance is None else np.asarray(importance, dtype=np.float32)
    n = W.shape[1]
    static = btype.fit(W.cpu().numpy(), imp) if gptq.act_order else None
    W = W[:, fh.perm.to(W.device)].contiguous()
    lazy = max(btype.block, (gptq.block_size // btype.block) * btype.block)
    with single_thread():
        codes, params = _column_loop(W, fh.U.to(W.device), fh.perm.cpu(), btype, imp, lazy, static)
    inv = torch.argsort(fh.perm.cpu())
    codes = codes.cpu()[:, inv].numpy()
    raw = btype.pack(params, codes)
    return BlockResult(btype.name, raw, torch.from_numpy(btype.dequantize(raw, n)).to(weight.device))


def _column_loop(W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor, btype: BlockType, importance: np.ndarray,
                 lazy: int, static: dict | None) -> tuple[torch.Tensor, dict]:
    """Quantize W's (visit-ordered) columns in place; returns codes (visit order) and the block params."""
    out, n = W.shape
    codes = torch.zeros(out, n, dtype=torch.uint8, device=W.device)
    fitted: list[dict] = []
    scale = bias = None
    if static is not None:
        s, b = btype.effective(static)
        scale, bias = torch.from_numpy(s).to(W.device), torch.from_numpy(b).to(W.device)
    for i1 in range(0, n, lazy):
        i2 = min(i1 + lazy, n)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if static is None and col % btype.block == 0:
                # The whole block lies inside this lazy batch (lazy is a multiple of the block), so
                # W1 holds its columns with every correction applied so far.
                p = btype.fit(W1[:, i:i + btype.block].cpu().numpy(), importance[col:col + btype.block])
                fitted.append(p)
                s, b = btype.effective(p)
                scale, bias = torch.from_numpy(s).to(W.device), torch.from_numpy(b).to(W.device)
            j = int(perm[col]) if static is not None else col % btype.block
            sub = j // btype.sub
            w = W1[:, i]
            c, q = _round_to_grid(w, scale[:, sub], bias[:, sub], btype)
            codes[:, col] = c
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    params = static if static is not None else {k: np.concatenate([p[k] for p in fitted], axis=1)
                                                for k in fitted[0]}
    return codes, params


def _round_to_grid(w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, btype: BlockType
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of each row's value under dequant = scale * value(code) + bias, and its value.

    A linear grid (value = code - zero) rounds directly; a non-linear one (the i-quants' level table) takes
    the nearest of its levels times the row's scale (a zero scale gives code `zero`, as ggml does)."""
    if btype.levels is not None:
        levels = torch.from_numpy(btype.levels).to(w.device)
        cand = scale.unsqueeze(1) * levels + bias.unsqueeze(1)  # [rows, n_levels]
        c = (w.unsqueeze(1) - cand).abs().argmin(1)
        c = torch.where(scale == 0, torch.full_like(c, btype.zero), c)
        return c.to(torch.uint8), scale * levels[c] + bias
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    c = torch.round((w - bias) / safe) + btype.zero
    c = torch.where(scale == 0, torch.full_like(c, btype.zero), c).clamp(btype.qmin, btype.qmax)
    q = scale * (c - btype.zero) + bias
    return c.to(torch.uint8), q
