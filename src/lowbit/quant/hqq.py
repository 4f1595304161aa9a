"""HQQ: half-quadratic quantization (Badri & Shaji, 2023), calibration-free, on lowbit's shared grid.

RTN fits each group's range to its min and max, so one outlier stretches the
grid for every other weight of the group. HQQ instead minimises a sparsity-
promoting loss of the rounding error, ||W - dequant(quant(W))||_p with p < 1,
which lets a few weights carry a large error so the bulk fits the grid well.
The half-quadratic split introduces an auxiliary error tensor W_e and alternates
two closed-form steps per iteration:

  * W_e = shrink_p(W - W_r): the generalised soft threshold of the current
    error (the proximal operator of the l_p term), which keeps only the large,
    "outlier" part of the error;
  * the grid parameters that make dequant(quant(W)) best fit W - W_e in the
    least-squares sense: the zero point is a mean, and (lowbit's addition)
    the scale is a one-variable least squares on the same target.

beta (the penalty weight) grows by kappa each iteration, as in the reference.

What lowbit changes, and why:
  * **Integer zeros by default.** The reference keeps a float zero point per
    group, which no GPTQ, AWQ or compressed-tensors file can hold. lowbit
    projects the zero onto the integers inside the loop (a projected step), so
    the solution is exportable to every format lowbit writes, bit for bit.
    With `:fzero` (GridConfig.float_zero) the zero stays a float16, as the
    reference's does, for lowbit checkpoints and MLX folders.
  * **Scale step (integer and symmetric grids only).** With an integer zero,
    the zero step alone moves in whole codes; a least-squares scale step gives
    the solver a continuous variable back. It is also what makes HQQ do
    anything on a symmetric grid, whose zero is fixed. A float zero is already
    continuous, and there the scale step trades the outliers' error for the
    bulk's and loses (4-bit g64 wiki KLD 0.2204 with it, 0.2039 without).
  * **Best iterate per group.** The reference stops the whole tensor at the
    first iteration whose mean |error| does not improve (keeping that
    iteration's zero). lowbit starts from RTN's fit and keeps, for each group,
    the iterate with the lowest squared error (scales rounded to float16 at
    every step, as stored), so no group ends with a larger error than RTN's.
    The l_p loss steers the steps; the output sees the squared error.
  * Short last groups (a 576-wide row in groups of 128) are masked, not padded
    into the statistics.
`reference_quantize` is the package's algorithm as published (float zero,
zero step only, global early stop); tests check it against hqq's own output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quant.grid import (GridConfig, QuantizedTensor, fp16_nonzero, encode, fit_scale_zero, from_groups,
                               group_view)


@dataclass(frozen=True)
class HQQConfig:
    """The solver's settings; the defaults are the reference's (lp_norm 0.7, beta 10, kappa 1.01, 20 iterations)."""

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    scale_step: bool = True
    tol: float = 1e-4  # stop once an iteration lowers the tensor's total squared error by less than this fraction


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft threshold: the proximal step of (1/beta)*|x|^p, as HQQ approximates it."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().pow(p - 1))


def _valid_mask(n_in: int, cfg: GridConfig, device: torch.device) -> torch.Tensor | None:
    """[n_groups, glen] bool: True on real columns, False on the padding of a short last group (None: no padding)."""
    n_groups, glen = cfg.groups_for(n_in)
    if n_groups * glen == n_in:
        return None
    return (torch.arange(n_groups * glen, device=device) < n_in).reshape(n_groups, glen)


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else torch.where(mask, x, torch.zeros_like(x))


def _residual(g: torch.Tensor, s: torch.Tensor, z: torch.Tensor, cfg: GridConfig
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, g - dequant(codes)) for scale s and zero z per group."""
    q = torch.clamp(torch.round(g / s.unsqueeze(-1) + z.unsqueeze(-1)), 0, cfg.qmax)
    return q, g - s.unsqueeze(-1) * (q - z.unsqueeze(-1))


def solve(g: torch.Tensor, mask: torch.Tensor | None, cfg: GridConfig, hcfg: HQQConfig = HQQConfig()
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero for groups on the last dim of `g` ([out, n_groups, glen]).

    Each pass rounds once and scores the current iterate by its squared error before improving it: the l_p
    loss drives the steps (its shrink lets outliers keep a large error), but which iterate a group keeps is
    decided by the error the layer's output sees. Kept by l_p, 4-bit g64 float-zero HQQ lost to the hqq
    package (wiki KLD 0.2247 vs 0.2078 on SmolLM2); kept by squared error it wins (0.2040).
    """
    count = g.shape[-1] if mask is None else mask.sum(-1).clamp(min=1).to(g.dtype)
    p = hcfg.lp_norm
    s, z = fit_scale_zero(g, cfg)
    best_s, best_z, best_err = s, z, None
    beta, prev_total = hcfg.beta, float("inf")
    for it in range(hcfg.iters + 1):
        q, r = _residual(g, s, z, cfg)
        a = r.abs()
        err = _masked(r * r, mask).sum(-1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
            best_err = torch.where(better, err, best_err)
        total = float(best_err.sum())
        if it == hcfg.iters or (it > 0 and prev_total - total <= hcfg.tol * prev_total):
            break
        prev_total = total
        a_pm1 = a.pow(p - 1)  # inf where r == 0, where the shrink gives 0
        target = g - torch.sign(r) * torch.relu(a - a_pm1 / beta)  # g - shrink(r)
        if not cfg.symmetric:
            z = _masked(q - target / s.unsqueeze(-1), mask).sum(-1) / count
            z = z.half().float() if cfg.float_zero else torch.clamp(torch.round(z), 0, cfg.qmax)
        if cfg.symmetric or (hcfg.scale_step and not cfg.float_zero):
            s = fp16_nonzero(_least_squares_scale(q - z.unsqueeze(-1), target, mask, s))
        beta *= hcfg.kappa
    return best_s, best_z


def _least_squares_scale(centred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                         fallback: torch.Tensor) -> torch.Tensor:
    """argmin_s ||s * (q - z) - target||^2 per group; keeps the old scale where it is undefined or not positive."""
    c = _masked(centred, mask)
    num = (c * target).sum(-1)
    den = (c * c).sum(-1)
    s = num / torch.where(den == 0, torch.ones_like(den), den)
    return torch.where((den > 0) & (s > 0), s, fallback)


def quantize_layer(weight: torch.Tensor, stats: object | None, config: GridConfig, name: str = "weight",
                   hcfg: HQQConfig = HQQConfig()) -> QuantizedTensor:
    """HQQ ignores calibration statistics by design: it fits the weights alone."""
    del stats, name
    w = weight.float()
    g = group_view(w, config)
    mask = _valid_mask(w.shape[1], config, g.device)
    s, z = solve(g, mask, config, hcfg)
    return from_groups(encode(g, s, z, config), s, z, config, w.shape[1])


def reference_quantize(weight: torch.Tensor, bits: int, group_size: int, hcfg: HQQConfig = HQQConfig()
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The algorithm as hqq 0.2.8 runs it (Quantizer.quantize, axis=1, optimize=True, round_zero=False).

    Float zero, zero step only, beta held constant (its legacy solver never applies kappa), and the whole
    tensor stops at the first iteration whose mean |error| does not improve, keeping that iteration's zero.
    Returns (codes, scale, zero) with dequant = (codes - zero) * scale, groups of `group_size` along the
    rows of the flattened weight. Kept to check lowbit's reading of the method against the package
    (tests/test_hqq.py), not used to quantize: its float zero fits no GPTQ, AWQ or compressed-tensors file.
    """
    W = weight.float().reshape(-1, group_size)
    qmax = float(2 ** bits - 1)
    wmin = W.min(dim=1, keepdim=True)[0]
    wmax = W.max(dim=1, keepdim=True)[0]
    denom = wmax - wmin
    inv = qmax / denom
    inv = torch.where(denom.abs() <= 1e-4, torch.full_like(inv, 1.0), inv).clamp(max=2e4)
    zero = -wmin * inv
    best = torch.tensor(float("inf"))
    for _ in range(hcfg.iters):
        q = torch.round(W * inv + zero).clamp(0, qmax)
        w_r = (q - zero) / inv
        w_e = shrink_lp(W - w_r, hcfg.beta, hcfg.lp_norm)
        zero = torch.mean(q - (W - w_e) * inv, dim=1, keepdim=True)
        current = torch.abs(W - w_r).mean()
        if current < best:
            best = current
        else:
            break
    q = torch.round(W * inv + zero).clamp(0, qmax)
    return q, 1.0 / inv, zero
