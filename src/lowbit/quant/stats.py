"""Activation statistics gathered from one calibration pass over a decoder layer.

Linears that read the same tensor share one statistic: q/k/v read the
attention norm's output, gate/up read the MLP norm's output. So a layer has
four input groups, keyed by their first member, and each statistic is
computed once per group:
  * sum of x^2 per input column and a token count (the importance matrix);
  * the Hessian 2/n * X^T X (GPTQ), when asked for, accumulated in float64 on the CPU and float32
    on a GPU (each batch's product in float32 where the caller asks: the GGUF pipeline);
  * mean |x| per column (AWQ), when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.model.forward import batches, decoder_layer
from lowbit.model.hf import ModelSpec
from lowbit.runtime import Placement

FORWARD_BATCH = 8  # calibration samples per forward pass

INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "q": ("q", "k", "v"),
    "o": ("o",),
    "gate": ("gate", "up"),
    "down": ("down",),
}
GROUP_OF: dict[str, str] = {member: lead for lead, members in INPUT_GROUPS.items() for member in members}


@dataclass
class GroupStats:
    """Statistics of one input group's activations."""

    sumsq: torch.Tensor | None = None  # float64 [in]
    count: int = 0
    hessian: torch.Tensor | None = None  # float64 [in, in], scaled 2/n
    abs_sum: torch.Tensor | None = None  # float64 [in]

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(1, self.count)).float()


class LayerStats:
    """Hook target for decoder_layer: accumulates what the method asked for, per input group."""

    def __init__(self, hessian: bool = False, activations: bool = False, dtype: torch.dtype = torch.float64,
                 sums: bool = True, product_dtype: torch.dtype | None = None):
        self.dtype = dtype  # float64 on the CPU; float32 on a GPU (lowbit.runtime.Placement.stats_dtype)
        self.product_dtype = product_dtype or dtype  # each batch's x^T x (see __call__)
        self.want_sums = sums  # sum of x^2 (the imatrix); GPTQ alone reads diag(H) instead
        self.want_hessian = hessian
        self.want_activations = activations
        self.groups: dict[str, GroupStats] = {g: GroupStats() for g in INPUT_GROUPS}

    def __call__(self, short: str, x: torch.Tensor) -> None:
        if short not in INPUT_GROUPS:
            return
        rows = x.reshape(-1, x.shape[-1])
        g = self.groups[short]
        n_old, n_new = g.count, rows.shape[0]
        if self.want_sums or self.want_activations:
            x64 = rows.to(self.dtype)
            if self.want_sums:
                g.sumsq = _add(g.sumsq, x64.pow(2).sum(0))
            if self.want_activations:
                g.abs_sum = _add(g.abs_sum, x64.abs().sum(0))
        if self.want_hessian:
            # Running mean of 2 x x^T (the GPTQ reference's scaling), accumulated in self.dtype. With
            # product_dtype float32 each batch's product is a float32 GEMM (as GPTQ's reference and
            # GPTQModel compute it): 1.6x faster than float64 on the CPU, ~1e-6 relative error.
            xp = rows.to(self.product_dtype)
            h_new = (xp.T @ xp).to(self.dtype) * (2.0 / (n_old + n_new))
            g.hessian = h_new if g.hessian is None else g.hessian * (n_old / (n_old + n_new)) + h_new
        g.count = n_old + n_new

    def for_linear(self, short: str) -> GroupStats:
        return self.groups[GROUP_OF[short]]


def _add(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if acc is None else acc + value


def gather_stats(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, rope, stats: LayerStats,
                 where: Placement = Placement()) -> LayerStats:
    """Run the layer over every calibration batch (on `where`'s device) with `stats` hooked in."""
    for sl in batches(x.shape[0], FORWARD_BATCH):
        decoder_layer(where.compute(x[sl]), w, spec, rope, hook=stats)
    return stats
