"""AWQ: activation-aware scaling and clipping (Lin et al., 2023), on lowbit's shared grid.

Weights that meet large activations matter most. AWQ multiplies each input
channel of a linear by s (and divides the producer of that channel, a norm or
a linear, by s), which leaves the FP function unchanged but gives salient
channels more grid resolution. s = mean|x|^a (optionally over mean|w|^(1-a),
"duo" scaling) is chosen per smoothing group by grid search on the real
output error. Then a per-(row, group) clipping ratio is searched the same way.

Both searches score the output error over *all* calibration tokens at once
through the Gram matrix G = X^T X: ||X D^T||^2 = sum_r d_r G d_r^T for a weight
error D. That costs out*in^2 per candidate however many tokens there are, where
the usual implementations multiply a token subsample for every candidate.

Smoothing groups (producer -> consumers):
  attn_norm -> q, k, v;  v -> o (only without GQA);  ffn_norm -> gate, up;  up -> down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.model.hf import ModelSpec
from lowbit.quant.grid import (GridConfig, QuantizedTensor, decode, encode, fit_scale_zero, from_groups, group_view,
                               ungroup)
from lowbit.quant.stats import GroupStats, LayerStats


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    skip_clip: tuple[str, ...] = ("q", "k")  # attention logits are too sensitive to clipped q/k
    # the scale search's error products: bfloat16 (float32 accumulation) where a caller trades the last
    # digits of each candidate's error for speed (AutoRound's equalization, which SignRound refines anyway)
    error_dtype: torch.dtype = torch.float32


SMOOTHING = (
    ("attn_norm", ("q", "k", "v"), "q"),
    ("v", ("o",), "o"),
    ("ffn_norm", ("gate", "up"), "gate"),
    ("up", ("down",), "down"),
)


def fake_quant(w: torch.Tensor, cfg: GridConfig, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """w quantized and dequantized on the grid, same shape."""
    g = group_view(w, cfg)
    scale, zero = fit_scale_zero(g, cfg, clip)
    return ungroup(decode(encode(g, scale, zero, cfg), scale, zero), w.shape[1])


def _candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, acfg: AWQConfig):
    """s = 1 (plain RTN, so the search never loses to it), then the exponent grid.

    The grid uses the weight-aware "duo" form x^a / w^(1-a) (AutoAWQ's and
    llm-compressor's default) or the paper's x^a.
    """
    yield 0.0, torch.ones_like(x_mean)
    for i in range(1, acfg.n_grid):
        a = i / acfg.n_grid
        s = x_mean.pow(a) / w_mean.pow(1 - a).clamp(min=1e-4) if acfg.duo_scaling else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        yield a, s / (s.max() * s.min()).sqrt()


def output_error(diff: torch.Tensor, gram: torch.Tensor) -> float:
    """Mean squared output error of a weight error `diff` [out, in] over the tokens behind `gram`
    (in `gram`'s dtype: a bfloat16 Gram matrix gives a bfloat16 product, summed in float32)."""
    return float(((diff.to(gram.dtype) @ gram).float() * diff).sum())


FakeQuant = Callable[[torch.Tensor], torch.Tensor]


def search_scale(weights: list[torch.Tensor], gram: torch.Tensor, x_mean: torch.Tensor, cfg: GridConfig,
                 acfg: AWQConfig, fakes: list[FakeQuant] | None = None) -> tuple[torch.Tensor, float]:
    """Per-input-channel scale minimising the concatenated output error over all calibration tokens.

    `fakes` (one per weight) quantize-dequantize on the grid each weight will
    really be stored on (a GGUF block type, say); by default lowbit's grid `cfg`.
    """
    fakes = fakes or [lambda t: fake_quant(t, cfg)] * len(weights)
    w = torch.cat(weights, 0)
    w_mean = group_view(w.abs(), cfg)
    w_mean = ungroup(w_mean / w_mean.amax(-1, keepdim=True).clamp(min=1e-8), w.shape[1]).mean(0)
    best_err, best_s, best_a = float("inf"), torch.ones_like(x_mean), 0.0
    for a, s in _candidate_scales(x_mean, w_mean, acfg):
        deq = torch.cat([fq(wi * s) for fq, wi in zip(fakes, weights)], 0)
        err = output_error(w - deq / s, gram)
        if err < best_err:
            best_err, best_s, best_a = err, s, a
    return best_s, best_a


def smooth_block(w: dict[str, torch.Tensor], stats: LayerStats, cfg: GridConfig, spec: ModelSpec,
                 acfg: AWQConfig = AWQConfig(), fakes: dict[str, FakeQuant] | None = None) -> dict[str, float]:
    """Fold searched scales into `w` in place (FP function unchanged); returns the chosen exponent per group.

    `fakes` maps a linear's short name to its fake quantizer when it is not `cfg`'s grid."""
    chosen = {}
    for producer, consumers, group in SMOOTHING:
        if producer == "v" and spec.num_heads != spec.num_kv_heads:
            continue  # v's channels are shared by several heads' o inputs: no consistent scale exists
        g = stats.groups[group]
        if g.hessian is None:
            continue
        s, a = search_scale([w[c] for c in consumers], g.hessian.to(acfg.error_dtype), g.mean_abs(), cfg, acfg,
                            [fakes[c] for c in consumers] if fakes else None)
        for c in consumers:
            w[c] = w[c] * s
        if producer in ("attn_norm", "ffn_norm"):
            w[producer] = w[producer] / s
        else:
            w[producer] = w[producer] / s.view(-1, 1)
            if f"{producer}_bias" in w:
                w[f"{producer}_bias"] = w[f"{producer}_bias"] / s
        # The consumers now read x / s: keep the statistics describing their real input.
        s64 = s.to(g.hessian.dtype)  # float64 on the CPU, the statistics' own dtype on a GPU
        g.hessian = g.hessian / s64.view(-1, 1) / s64.view(1, -1)
        g.abs_sum = g.abs_sum / s64
        g.sumsq = g.sumsq / s64.pow(2)
        chosen[group] = a
    return chosen


def search_clip(weight: torch.Tensor, gram: torch.Tensor, cfg: GridConfig, acfg: AWQConfig) -> torch.Tensor:
    """Per-(row, group) range shrink in [1 - max_shrink, 1] minimising that group's output error.

    A group's error only involves its own columns: d_g G_gg d_g^T with G_gg the
    group's diagonal block of the Gram matrix (cross-group terms are ignored,
    as in AWQ's per-group search).
    """
    wg = group_view(weight, cfg)  # [out, ng, gl]
    n_groups, glen = wg.shape[1], wg.shape[2]
    padded = torch.zeros(n_groups * glen, n_groups * glen, dtype=gram.dtype, device=gram.device)
    padded[: gram.shape[0], : gram.shape[1]] = gram
    blocks = torch.stack([padded[g * glen:(g + 1) * glen, g * glen:(g + 1) * glen] for g in range(n_groups)])
    best = torch.ones(wg.shape[:2], device=wg.device)
    best_err = torch.full(wg.shape[:2], float("inf"), device=wg.device)
    steps = int(acfg.clip_grid * acfg.clip_max_shrink) + 1
    for i in range(steps):
        r = 1 - i / acfg.clip_grid
        scale, zero = fit_scale_zero(wg, cfg, r)
        diff = wg - decode(encode(wg, scale, zero, cfg), scale, zero)  # [out, ng, gl]
        err = torch.einsum("ogl,glm,ogm->og", diff, blocks, diff)
        better = err < best_err
        best = torch.where(better, torch.full_like(best, r), best)
        best_err = torch.where(better, err, best_err)
    return best


def quantize_layer(weight: torch.Tensor, stats: GroupStats | None, config: GridConfig, name: str = "weight",
                   acfg: AWQConfig = AWQConfig()) -> QuantizedTensor:
    """Quantize an (already smoothed) weight with AWQ's clipping search; RTN when there is no sample."""
    short = name.rsplit(".", 2)[-2].removesuffix("_proj") if "." in name else name
    g = group_view(weight, config)
    clip: float | torch.Tensor = 1.0
    if acfg.clip and stats is not None and stats.hessian is not None and short not in acfg.skip_clip:
        clip = search_clip(weight, stats.hessian.float(), config, acfg)
    scale, zero = fit_scale_zero(g, config, clip)
    return from_groups(encode(g, scale, zero, config), scale, zero, config, weight.shape[1])
