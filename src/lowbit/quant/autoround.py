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
  * On lowbit's sequential pipeline: the block's inputs are the calibration activations after the layers
    before it, *quantized*, and the target is the float block's output on those same inputs (auto-round
    targets the float block on float inputs; lowbit keeps one activation stream, as its GPTQ and AWQ do).
  * Mini-batches of `batch` samples are drawn with a seeded generator, so a run is byte-reproducible.
  * The grid is lowbit's own (any bits, group, symmetric or not, a masked short last group), so the
    result exports exactly to every format the grid fits (GPTQ, compressed-tensors, AWQ, lowbit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.model.forward import decoder_layer
from lowbit.model.hf import ModelSpec
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

    def tensors(self) -> list[torch.Tensor]:
        return [self.v, self.alpha, self.beta]

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable scale (float) and zero (rounded with a straight-through estimator)."""
        cfg = self.cfg
        wmax = self.g.amax(-1).clamp(min=0) * self.alpha
        wmin = self.g.amin(-1).clamp(max=0) * self.beta
        if cfg.symmetric:
            amax = torch.maximum(wmax, -wmin)
            scale = amax / cfg.sym_zero
            zero = torch.full_like(scale, float(cfg.sym_zero))
        else:
            scale = (wmax - wmin) / cfg.qmax
            zero = _ste_round(-wmin / scale.clamp(min=1e-12)).clamp(0, cfg.qmax)
        scale = scale.clamp(min=1e-12)
        return scale + (fp16_nonzero(scale) - scale).detach(), zero  # stored as float16: train on that value

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale, zero = self.scale_zero()
        q = torch.clamp(_ste_round(self.g / scale.unsqueeze(-1) + self.v) + zero.unsqueeze(-1), 0, self.cfg.qmax)
        return q, scale, zero

    def fake(self) -> torch.Tensor:
        q, scale, zero = self.codes()
        return ungroup(scale.unsqueeze(-1) * (q - zero.unsqueeze(-1)), self.n_in)

    @torch.no_grad()
    def clamp_(self, lo: float, hi: float) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(lo, hi)
        self.beta.clamp_(lo, hi)

    @torch.no_grad()
    def quantized(self) -> QuantizedTensor:
        """The codes, float16 scales and zeros the last forward used, as they will be stored."""
        q, scale, zero = self.codes()
        return from_groups(q.detach(), scale.detach(), zero.detach(), self.cfg, self.n_in)


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def quantize_block(w: dict[str, torch.Tensor], x: torch.Tensor, spec: ModelSpec, rope, grid: GridConfig,
                   acfg: AutoRoundConfig = AutoRoundConfig()) -> dict[str, QuantizedTensor]:
    """Learn every linear of one decoder block on inputs `x` [N, T, H]; returns their quantized tensors."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().float()
        fixed = {k: v.detach().clone().float() for k, v in w.items()}
        with torch.no_grad():
            target = torch.cat([decoder_layer(x[i:i + acfg.batch], fixed, spec, rope)
                                for i in range(0, x.shape[0], acfg.batch)])
        params = {s: _Params(fixed[s], grid) for s in LINEAR_SHORTS}
        lr0 = acfg.lr if acfg.lr is not None else 1.0 / acfg.iters
        gen = torch.Generator().manual_seed(acfg.seed)
        best_loss, best = float("inf"), None
        for it in range(acfg.iters):
            idx = torch.randperm(x.shape[0], generator=gen)[:acfg.batch]
            qw = {**fixed, **{s: p.fake() for s, p in params.items()}}
            loss = torch.nn.functional.mse_loss(decoder_layer(x[idx], qw, spec, rope), target[idx])
            if loss.item() < best_loss:
                best_loss = loss.item()
                best = [t.detach().clone() for p in params.values() for t in p.tensors()]
            loss.backward()
            lr = lr0 * (1 - it / acfg.iters)
            with torch.no_grad():
                for p in params.values():
                    for t in p.tensors():
                        t -= lr * torch.sign(t.grad)
                        t.grad = None
                    p.clamp_(*acfg.clip_range)
        if best is not None:
            flat = [t for p in params.values() for t in p.tensors()]
            with torch.no_grad():
                for t, b in zip(flat, best):
                    t.copy_(b)
        return {s: p.quantized() for s, p in params.items()}
