"""AutoRound (SignRound; Cheng et al., arXiv:2309.05516): rounding and clipping learned per decoder block.

RTN rounds every weight to its nearest grid point; GPTQ corrects column by column through a quadratic
model of one linear. AutoRound instead learns, for every linear of a block at once, a rounding offset
V in [-0.5, 0.5] per weight (q = round(W/s + V) + zero) and a clipping pair (alpha, beta) in [0.5, 1] per
group that shrinks the group's max and min, by minimising the block's real output error on calibration
inputs. Rounding is made differentiable with the straight-through estimator, and each step moves the
parameters by lr * sign(gradient) (signed gradient descent: a fixed step size fits a bounded offset and
needs no tuning of the gradient scale), with the learning rate decaying linearly to 0; the best iterate by
loss is kept.

How lowbit runs it, and what differs from the auto-round package:
  * On lowbit's sequential pipeline, as auto-round: the block's inputs are the calibration activations
    after the layers before it, *quantized*, and its target is the float model's activations after it (the
    pipeline carries a float stream beside the quantized one for this method: Method.fp_targets).
  * Mini-batches of `batch` samples are drawn with a seeded generator, so a run is byte-reproducible.
  * The grid is lowbit's own (any bits, group, symmetric or not, a masked short last group), so the
    result exports exactly to every format the grid fits (GPTQ, compressed-tensors, AWQ, lowbit).
  * Before SignRound, by default, AWQ's equalization (lowbit.quant.awq.smooth_block, searched on the
    block's quantized inputs) is folded into the block's norms and producers: the float function is
    unchanged, but the input channels the activations make salient get finer steps, which SignRound's
    offsets (half a step at most) and per-group clip ratios cannot give them.
  * Massive activations are left out of the loss: tokens whose float output norm is over 10x the median
    (the attention sink, from the middle layers on). The quantized inputs carry the error of every block
    before, and on those tokens, hundreds of times larger than the rest, that inherited error is most of
    the squared error a deep block sees (96% at SmolLM2's block 15); SignRound would spend its steps on it.
  * Mixed precision: the block's matmuls run in bfloat16 (autocast; float32 accumulation) wherever the
    hardware multiplies bfloat16 natively (AVX512-BF16/AMX CPUs, CUDA), as auto-round's own CPU default
    does; the fake weights are computed in float32 and rounded once, the loss and targets stay float32.
    Config flag `fp32` keeps float32. The fake quantization's element-wise forward and backward are fused by
    torch.compile where it works (lowbit.quant.fused), eager otherwise.
  * SignRound's result depends on its mini-batch draws: on SmolLM2 W4G128 two seeds gave whole-model KLD
    0.138 and 0.145. With `restarts` = N (config flag rN) each block is learned N times (seeds seed,
    seed + 1000, ...) and the run whose best iterate has the lower output error over *all* calibration
    samples is kept: N times the time (so not the default), a lower error and less spread (r2: 0.132).
  * `AutoRoundConfig.plain()` (config flag `plain`) is SignRound alone once with the plain loss, the
    auto-round package's recipe. Measured on SmolLM2 at W4G128 (32 x 128 calibration tokens, 50 iterations,
    16 x 512 held-out tokens): benchmarks/results/methods_autoround.md. Tried and not kept: refining the
    group scales by Adam after SignRound (codes fixed: 0.96x KLD alone, nothing on top of equalization,
    twice the time); a full batch of all 32 samples per step (1.07x); the best iterate chosen on all samples
    (1.02x wiki); lr 0.03 / 0.015 / 0.01 (1.14x / 1.02x / 1.12x); an importance-weighted clip search as the
    start (1.04x wiki, 0.91x Botchan); GPTQ's codes (static groups, on the equalized block) as the start
    offsets (1.25x wiki, 1.28x Botchan). lr 1 / iters stays.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lowbit.model.forward import decoder_layer
from lowbit.model.hf import ModelSpec
from lowbit.quant import awq, fused
from lowbit.quant.stats import LayerStats, gather_stats
from lowbit.runtime import Placement, native_bf16
from lowbit.quant.grid import GridConfig, QuantizedTensor, fp16_nonzero, from_groups, group_view, ungroup

LINEAR_SHORTS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class AutoRoundConfig:
    """lr 1/iters and batch 8 are the paper's; 200 iterations is its default, 50 auto-round's 'light' recipe
    (lowbit's default, QuantConfig.iters: a block takes about 1.5 s per iteration on 2 CPU cores at 8 x 512
    tokens for SmolLM2)."""

    iters: int = 50
    lr: float | None = None  # None: 1 / iters
    batch: int = 8
    seed: int = 0
    clip_range: tuple[float, float] = (0.5, 1.0)
    smooth: bool = True  # fold AWQ's equalization into the block first
    restarts: int = 1  # learn each block this many times (other seeds), keep the lowest calibration error
    amp: bool | None = None  # matmuls in bfloat16; None: where the hardware has them (runtime.native_bf16)
    massive: float | None = 10.0  # leave out of the loss tokens whose output norm is over this x the median

    @classmethod
    def plain(cls, iters: int = 50, lr: float | None = None, seed: int = 0) -> "AutoRoundConfig":
        """SignRound alone, once, as the auto-round package runs it."""
        return cls(iters, lr, seed=seed, smooth=False, massive=None)

    def matmul_dtype(self, device: torch.device) -> torch.dtype:
        amp = native_bf16(device) if self.amp is None else self.amp
        return torch.bfloat16 if amp else torch.float32


class _Params:
    """The learnable offsets and clip ratios of one linear, and its differentiable fake quantization."""

    def __init__(self, w: torch.Tensor, cfg: GridConfig):
        self.cfg = cfg
        self.n_in = w.shape[1]
        self.g = group_view(w.float(), cfg)  # [out, n_groups, glen]
        self.v = torch.zeros_like(self.g, requires_grad=True)
        shape = self.g.shape[:2]
        self.alpha = torch.ones(shape, requires_grad=True)
        self.beta = torch.ones(shape, requires_grad=True)
        extreme = torch.gather(self.g, -1, self.g.abs().argmax(-1, keepdim=True)).squeeze(-1)
        self.positive_extreme = extreme > 0  # the sign RTN's symmetric scale takes (first largest |w|)
        self.group_max = self.g.amax(-1).clamp(min=0)  # the weights are fixed: their extremes once
        self.group_min = self.g.amin(-1).clamp(max=0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.v, self.alpha, self.beta]

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable scale (float) and zero (rounded with a straight-through estimator)."""
        cfg = self.cfg
        wmax = self.group_max * self.alpha
        wmin = self.group_min * self.beta
        if cfg.symmetric:
            # the signed extreme, as lowbit's RTN (grid.fit_scale_zero) and auto-round take it: the group's
            # largest magnitude lands exactly on code 0 (-2^(b-1) levels), whichever its sign; a positive
            # scale max|w|/2^(b-1) would clip a positive extreme to 2^(b-1)-1 levels
            positive = (wmax > -wmin) | ((wmax == -wmin) & self.positive_extreme)  # ties: RTN's choice
            scale = torch.where(positive, wmax, wmin) / -cfg.sym_zero
            zero = torch.full_like(scale, float(cfg.sym_zero))
            return _as_stored(scale), zero
        # the zero is rounded against the stored (float16) scale, as grid.fit_scale_zero does
        scale = _as_stored(((wmax - wmin) / cfg.qmax).clamp(min=1e-12))
        return scale, _ste_round(-wmin / scale).clamp(0, cfg.qmax)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference formulation (autograd through each op); `fake` runs the same maths fused."""
        scale, zero = self.scale_zero()
        q = torch.clamp(_ste_round(self.g / scale.unsqueeze(-1) + self.v) + zero.unsqueeze(-1), 0, self.cfg.qmax)
        return q, scale, zero

    def fake(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale, zero = self.scale_zero()
        return ungroup(FakeQuant.apply(self.g, self.v, scale, zero, self.cfg.qmax, dtype), self.n_in)

    def ranges(self, lo: float, hi: float) -> list[tuple[float, float]]:
        """Each learnable's bounds (tensors() order): SignRound steps stay inside them."""
        return [(-0.5, 0.5), (lo, hi), (lo, hi)]

    @torch.no_grad()
    def quantized(self) -> QuantizedTensor:
        """The codes, float16 scales and zeros the last forward used, as they will be stored."""
        q, scale, zero = self.codes()
        return from_groups(q.detach(), scale.detach(), zero.detach(), self.cfg, self.n_in)


class FakeQuant(torch.autograd.Function):
    """s * (clamp(round(g / s + v) + z, 0, qmax) - z) with straight-through rounding, in one pass each way.

    The same values and gradients as autograd through the separate ops of `_Params.codes` (a test checks
    both). The element-wise work on the fake weights was most of an iteration's time on CPU, and it is
    bound by memory traffic, so the forward saves exactly what the backward multiplies by, and both run as
    kernels torch.compile fuses into one loop each where it can (lowbit.quant.fused: 5x faster on 2 CPU
    cores; the same arithmetic eagerly otherwise). With m the in-range mask of the clamp:
    d/dv = s*m, d/ds = sum over the group of (q - z) - m*g/s, d/dz = -s * sum of (1 - m).
    `dtype` (bfloat16 under lowbit's mixed precision) is the fake weight's own: written once in the matmul's
    precision rather than cast by autocast on every use."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
                dtype: torch.dtype = torch.float32):
        want = ctx.needs_input_grad
        out, slope, rate, inside = fused.kernel(fake_quant_forward)(g, v, scale, zero, qmax, dtype,
                                                                    want[1], want[2], want[3])
        ctx.save_for_backward(slope, rate, scale, inside)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_v, grad_s, grad_z = fused.kernel(fake_quant_backward)(grad, *ctx.saved_tensors)
        return None, grad_v, grad_s, grad_z, None, None


def fake_quant_forward(g: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int,
                       dtype: torch.dtype, want_slope: bool, want_rate: bool, want_mask: bool):
    """FakeQuant's forward: the fake weight, and what its backward needs (d out/d v, d out/d s, the mask)."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    a = g / s
    t = torch.round(a + v) + z
    q = t.clamp(0, qmax)
    inside = q == t
    qz = q - z
    out = (qz * s).to(dtype)
    slope = torch.where(inside, s, 0.0) if want_slope else None
    rate = qz - torch.where(inside, a, 0.0) if want_rate else None
    return out, slope, rate, inside if want_mask else None


def fake_quant_backward(grad: torch.Tensor, slope: torch.Tensor | None, rate: torch.Tensor | None,
                        scale: torch.Tensor, inside: torch.Tensor | None):
    grad_v = grad * slope if slope is not None else None
    grad_s = (grad * rate).sum(-1) if rate is not None else None
    grad_z = -scale * torch.where(inside, 0.0, grad).sum(-1) if inside is not None else None
    return grad_v, grad_s, grad_z


def _as_stored(scale: torch.Tensor) -> torch.Tensor:
    """The float16 value the scale will be stored as, with the float gradient (straight-through)."""
    return scale + (fp16_nonzero(scale) - scale).detach()


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def quantize_block(w: dict[str, torch.Tensor], x: torch.Tensor, spec: ModelSpec, rope, grid: GridConfig,
                   acfg: AutoRoundConfig = AutoRoundConfig(),
                   target: torch.Tensor | None = None) -> dict[str, QuantizedTensor]:
    """Learn every linear of one decoder block on inputs `x` [N, T, H]; returns their quantized tensors.

    `target` is what the block should output for `x`: the float block's output on the *float* inputs, as
    auto-round does (the pipeline carries both streams), so each block also learns to undo the error of
    the quantized blocks before it. None: the float block's output on `x` itself."""
    if acfg.smooth:
        smooth(w, x, spec, rope, grid, acfg.matmul_dtype(x.device))
    best_error, best, runs = float("inf"), None, max(acfg.restarts, 1)
    for k in range(runs):
        with torch.inference_mode(False):  # the pipeline runs in inference mode; learnables need autograd
            params = {s: _Params(w[s].detach().clone().float(), grid) for s in LINEAR_SHORTS}
        error = learn_block(w, x, spec, rope, params, replace(acfg, seed=acfg.seed + 1000 * k), target,
                            measure=runs > 1)
        if error is None or error < best_error:  # ties keep the earlier run
            best_error, best = error, params
    return {s: p.quantized() for s, p in best.items()}


def smooth(w: dict[str, torch.Tensor], x: torch.Tensor, spec: ModelSpec, rope, grid: GridConfig,
           dtype: torch.dtype = torch.float32) -> None:
    """AWQ's scale search on the block's inputs `x`, folded into `w` in place (norms and producers: the
    pipeline stores them, and the next block's inputs are computed with them). Each batch's Gram product
    in float32 (the running mean stays in the statistics' dtype), and the search's error products in
    `dtype`, SignRound's matmul precision: the search only ranks 20 candidate scales."""
    where = Placement(x.device)
    with torch.no_grad():
        stats = gather_stats(x, w, spec, rope, LayerStats(True, True, where.stats_dtype,
                                                          product_dtype=torch.float32), where)
    awq.smooth_block(w, stats, grid, spec, awq.AWQConfig(error_dtype=dtype))


def learn_block(w: dict[str, torch.Tensor], x: torch.Tensor, spec: ModelSpec, rope, params: dict,
                acfg: AutoRoundConfig, target: torch.Tensor | None = None, measure: bool = False) -> float | None:
    """SignRound's loop: move each learnable of `params` (short -> an object with fake(dtype), tensors() and
    ranges(lo, hi)) by lr * sign(gradient) of the block's output error, keeping the best iterate in place.
    Linears not in `params` run as they are in `w`. With `measure`, returns the kept iterate's mean squared
    output error over all of `x` (what restarts compare; one more forward pass over the samples)."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().float()
        fixed = {k: v.detach().clone().float() for k, v in w.items()}
        if target is None:
            with torch.no_grad():
                target = torch.cat([decoder_layer(x[i:i + acfg.batch], fixed, spec, rope)
                                    for i in range(0, x.shape[0], acfg.batch)])
        target = target.detach().float()
        weight = _token_weights(target, acfg.massive)
        lr0 = acfg.lr if acfg.lr is not None else 1.0 / max(acfg.iters, 1)
        gen = torch.Generator().manual_seed(acfg.seed)
        learnables = [t for p in params.values() for t in p.tensors()]
        bounds = [r for p in params.values() for r in p.ranges(*acfg.clip_range)]
        dtype = acfg.matmul_dtype(x.device)
        best_loss, best = float("inf"), None
        for it in range(acfg.iters):
            idx = torch.randperm(x.shape[0], generator=gen)[:acfg.batch]
            qw = {**fixed, **{s: p.fake(dtype) for s, p in params.items()}}
            with _matmuls_in(dtype, x.device, x.shape[1]):
                out = decoder_layer(x[idx], qw, spec, rope)
            loss = _block_loss(out.float(), target[idx], None if weight is None else weight[idx])
            if loss.item() < best_loss:
                best_loss = loss.item()
                best = _keep(learnables, best)
            loss.backward()
            lr = lr0 * (1 - it / acfg.iters)
            with torch.no_grad():
                for t, (lo, hi) in zip(learnables, bounds):
                    t.sub_(t.grad.sign_(), alpha=lr).clamp_(lo, hi)
                    t.grad = None
        with torch.no_grad():
            if best is not None:
                for t, b in zip(learnables, best):
                    t.copy_(b)
            if not measure:
                return None
            learned = {**fixed, **{s: p.fake() for s, p in params.items()}}
        return _mean_error(x, target, learned, spec, rope, acfg.batch, weight)


def _keep(tensors: list[torch.Tensor], into: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """A copy of `tensors` (the best iterate so far), reusing the buffers of the previous one."""
    if into is None:
        return [t.detach().clone() for t in tensors]
    for b, t in zip(into, tensors):
        b.copy_(t)
    return into


MATH_ATTENTION_MAX_SEQ = 128


def _matmuls_in(dtype: torch.dtype, device: torch.device, seqlen: int):
    """bfloat16 autocast for SignRound's forward (only the sign of each gradient is used, and the fake
    weights are exact in float32 before the cast); on the CPU, for short samples, also the plain softmax
    attention: there the fused kernel's backward costs more than it saves, and from 256 tokens on it is the
    other way round (SmolLM2 block, batch 8, 2 cores, per iteration: 128 tokens 0.053 s plain against
    0.058 s fused; 256 tokens, on K-quant grids, 0.120 s against 0.108 s)."""
    stack = contextlib.ExitStack()
    if dtype != torch.float32:
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
    if device.type == "cpu" and seqlen <= MATH_ATTENTION_MAX_SEQ:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def _token_weights(target: torch.Tensor, massive: float | None) -> torch.Tensor | None:
    """1 for each calibration token [N, T] the loss counts, 0 for a massive activation: a token whose float
    output norm is over `massive` times the median token's (the attention sink, position 0 and the odd
    delimiter, from the middle layers on). The quantized stream inherits the error of every block before it,
    and on those tokens, whose values are hundreds of times the others', that inherited error is most of
    the squared error (SmolLM2 W4G128, RTN stream, fp targets: 96% at block 15, 78% at block 25 from the 33
    of 4096 tokens over 10x), so without this SignRound spends its steps on what the block cannot undo.
    None when no token is left out (the plain loss)."""
    if massive is None:
        return None
    norms = target.norm(dim=-1)
    weight = (norms <= massive * norms.median()).to(target.dtype)
    return None if bool(weight.all()) else weight


def _block_loss(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                reduction: str = "mean") -> torch.Tensor:
    """Squared output error per element, over the counted tokens: mean (SignRound's loss) or sum."""
    if weight is None:
        return torch.nn.functional.mse_loss(out, target, reduction=reduction)
    total = ((out - target).pow(2).sum(-1) * weight).sum()
    return total / (weight.sum().clamp(min=1) * out.shape[-1]) if reduction == "mean" else total


@torch.no_grad()
def _mean_error(x: torch.Tensor, target: torch.Tensor, weights: dict, spec: ModelSpec, rope, batch: int,
                token_weight: torch.Tensor | None = None) -> float:
    total = sum(float(_block_loss(decoder_layer(x[i:i + batch], weights, spec, rope), target[i:i + batch],
                                  None if token_weight is None else token_weight[i:i + batch], "sum"))
                for i in range(0, x.shape[0], batch))
    counted = target.shape[0] * target.shape[1] if token_weight is None else float(token_weight.sum())
    return total / (counted * target.shape[-1])
