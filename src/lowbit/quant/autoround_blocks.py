"""AutoRound onto llama.cpp's block grids (Q4_0 ... Q6_K): SignRound's learned rounding in a standard GGUF.

A ggml block type fixes each sub-block's (scale, bias) in its header; llama.cpp's search picks them and
then rounds every weight to the nearest code. Here the header is llama.cpp's own fit (imatrix-weighted:
by the imatrix when one is given, else by the calibration inputs' mean x^2, as GPTQ on block grids does),
and only the rounding is learned: an offset V in [-0.5, 0.5] per weight, code = round((w - bias) / scale
+ V) + zero, moved by AutoRound's signed gradient steps on the decoder block's output error against the
float model's (lowbit.quant.autoround.learn_block). The codes are then packed with the type's own layout,
so the file is a plain GGUF of the same type and size as llama-quantize's.

The clip ratios of lowbit's own AutoRound have no counterpart: a block's scale and min are 6-bit codes
relative to a float16 super-block scale, fitted by llama.cpp's search. Non-linear grids (the i-quants'
level tables) are left to llama.cpp's search (`supports`).
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.quant import fused
from lowbit.quant.ggml_blocks import BlockType


def supports(btype: BlockType) -> bool:
    """Linear grids only: an offset moves a weight between neighbouring codes of one scale."""
    return btype.levels is None


class BlockGridParams:
    """The learnable rounding offsets of one linear on a fixed ggml block fit."""

    def __init__(self, w: torch.Tensor, btype: BlockType, fit: dict[str, np.ndarray]):
        self.btype, self.fit = btype, fit
        scale, bias = btype.effective(fit)  # float32 [rows, n // sub]
        expand = lambda a: torch.from_numpy(np.ascontiguousarray(a)).repeat_interleave(btype.sub, dim=1)  # noqa: E731
        self.scale, self.bias = expand(scale), expand(bias)
        self.live = self.scale != 0
        # where a sub-block's scale is exactly 0 every code decodes to its bias; ggml keeps its search's codes
        # there (code `zero` without them), and so does this, so an unlearned tensor is llama.cpp's bytes
        search = fit.get("search_codes")
        self.dead_codes = (torch.full_like(self.scale, float(btype.zero)) if search is None else
                           torch.from_numpy(np.asarray(search, dtype=np.float32).reshape(self.scale.shape)))
        safe = torch.where(self.live, self.scale, torch.ones_like(self.scale))
        self.base = (w.detach().float() - self.bias) / safe + btype.zero  # the code each weight sits at
        self.v = torch.zeros_like(self.base, requires_grad=True)

    def tensors(self) -> list[torch.Tensor]:
        return [self.v]

    def _codes(self) -> torch.Tensor:
        """The reference formulation (autograd through each op); `fake` runs the same maths fused."""
        t = self.base + self.v
        q = t + (torch.round(t) - t).detach()  # straight-through rounding
        q = torch.clamp(q, self.btype.qmin, self.btype.qmax)
        return torch.where(self.live, q, self.dead_codes)

    def fake(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        bt = self.btype
        return BlockFake.apply(self.base, self.v, self.scale, self.bias, self.dead_codes, self.live, bt.qmin, bt.qmax,
                               bt.zero, dtype)

    def ranges(self, lo: float, hi: float) -> list[tuple[float, float]]:
        return [(-0.5, 0.5)]  # the offset only: the header fields stay llama.cpp's

    @torch.no_grad()
    def raw(self) -> np.ndarray:
        """The GGUF rows: llama.cpp's header fields and the learned codes."""
        return self.btype.pack(self.fit, self._codes().to(torch.uint8).numpy())


class BlockFake(torch.autograd.Function):
    """scale * (code - zero) + bias, code = clamp(round(base + v)) with straight-through rounding, in one pass
    each way: the values and gradient of autograd through `BlockGridParams._codes` (a test checks both), as
    autoround.FakeQuant does for lowbit's own grids. d/dv = scale where the code is live and inside the clamp."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, dead: torch.Tensor,
                live: torch.Tensor, qmin: int, qmax: int, zero: int, dtype: torch.dtype = torch.float32):
        out, slope = fused.kernel(block_fake_forward)(base, v, scale, bias, dead, live, qmin, qmax, zero, dtype)
        ctx.save_for_backward(slope)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slope,) = ctx.saved_tensors
        return (None, fused.kernel(block_fake_backward)(grad, slope)) + (None,) * 8


def block_fake_forward(base: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                       dead: torch.Tensor, live: torch.Tensor, qmin: int, qmax: int, zero: int, dtype: torch.dtype):
    r = torch.round(base + v)
    q = torch.where(live, r.clamp(qmin, qmax), dead)
    out = (scale * (q - zero) + bias).to(dtype)
    slope = torch.where(live & (r >= qmin) & (r <= qmax), scale, 0.0)
    return out, slope


def block_fake_backward(grad: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return grad.float() * slope
