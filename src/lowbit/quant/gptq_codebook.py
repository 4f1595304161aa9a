"""GPTQ onto a codebook grid whose scales are fixed before the loop (bitsandbytes' NF4 and INT8).

A bitsandbytes file stores per-block (NF4) or per-row (INT8) scales that the loader reconstructs exactly;
NF4's are even double-quantized. So the scales are fitted and quantized first, on the original weights
(what bitsandbytes itself does), and GPTQ only chooses the codes: column by column, each column's rounding
error is pushed onto the columns not yet quantized through the inverse Hessian's Cholesky factor, exactly
as in quant/gptq.py. Since the scales do not move, act-order needs no g_idx: columns may be visited by
descending Hessian diagonal and each still reads its own block's scale.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lowbit.quant.gptq import GPTQConfig
from lowbit.quant.gptq_blocks import FactoredHessian, factor_hessian
from lowbit.runtime import single_thread


class CodebookGrid(Protocol):
    block: int  # columns per scale along a row; 0 for one scale per row

    def encode(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor: ...

    def value(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor: ...


def factor(stats: object, n_in: int, name: str, gptq: GPTQConfig = GPTQConfig()) -> FactoredHessian:
    """Factor one input group's Hessian once for all the linears that read that input."""
    return factor_hessian(stats, n_in, name, gptq)


def quantize_codebook_gptq(weight: torch.Tensor, fh: FactoredHessian, scales: torch.Tensor, grid: CodebookGrid,
                           gptq: GPTQConfig = GPTQConfig()) -> torch.Tensor:
    """Codes [out, in] for `weight` on `grid` with fixed `scales` ([out, n_blocks], or [out] per row)."""
    out, n = weight.shape
    W = weight.detach().to(torch.float32).clone()
    W[:, fh.dead.to(W.device)] = 0.0  # inputs that never fire: their weights cannot matter
    perm = fh.perm.cpu()
    U = fh.U.to(W.device)
    col_block = (torch.arange(n) // grid.block) if grid.block else torch.zeros(n, dtype=torch.long)
    scales = scales.reshape(out, -1).float().to(W.device)
    W = W[:, perm.to(W.device)].contiguous()
    visit_block = col_block[perm]
    codes = None
    with single_thread():
        for i1 in range(0, n, gptq.block_size):
            i2 = min(i1 + gptq.block_size, n)
            W1 = W[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                s = scales[:, int(visit_block[i1 + i])]
                c = grid.encode(W1[:, i], s)
                if codes is None:
                    codes = torch.zeros(out, n, dtype=c.dtype, device=W.device)
                codes[:, i1 + i] = c
                err = (W1[:, i] - grid.value(c, s)) / U1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    assert codes is not None
    return codes[:, torch.argsort(perm).to(codes.device)].contiguous()
