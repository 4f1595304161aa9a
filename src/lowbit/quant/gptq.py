"""GPTQ (Frantar et al. 2022): quantize one column at a time, pushing each column's
rounding error onto the not-yet-quantized columns through the inverse Hessian.

For a linear layer y = x W^T the layer-output error of a weight change dW is
tr(dW H dW^T) with H = 2/n * sum x x^T, so columns are not independent: an error
in column q can be partly cancelled by moving the columns that correlate with it.
GPTQ quantizes the columns in a fixed order and, after each, applies the optimal
(OBS) correction to the remaining ones. The inverse Hessian of the remaining
columns at every step is read off the upper Cholesky factor U of H^-1 (row q of U,
divided by U[q, q]), so the whole layer needs a single factorization.

Updates are "lazy-batched": inside a block of `block_size` columns the
corrections are applied column by column, and the accumulated errors of the block
are applied to all later columns in one matrix product when the block ends.

Everything lands on the shared grid (lowbit.quant.grid): uint8 codes, fp16
scales, dequant = scale * (code - zero), so the returned QuantizedTensor
dequantizes to exactly the weights the algorithm produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.runtime import single_thread
from lowbit.quant.grid import (GridConfig, QuantizedTensor, decode, encode, fit_scale_zero, fit_scale_zero_mse,
                               group_view)


@dataclass(frozen=True)
class GPTQConfig:
    """Knobs of the algorithm (defaults follow the paper and common GPTQ checkpoints).

    damp_percent: diagonal damping as a fraction of mean(diag(H)); keeps the
        Cholesky factorization stable when H is ill-conditioned.
    block_size: columns per lazy-batch block (speed only, not the result up to
        float rounding).
    act_order: quantize columns by descending diag(H), so the most influential
        columns are quantized first while many columns remain to absorb error.
    static_groups: fit every group's scale/zero on the original weights before
        the loop (groups stay j // group_size, no g_idx needed) instead of on the
        error-updated weights when the loop reaches the group.
    max_damp_retries: how often damping is raised x10 after a failed Cholesky
        before giving up with a LowbitError.
    mse_grid: fit each group's range by searching the shrink that minimises its
        diag(H)-weighted rounding error (lowbit's default) instead of plain
        min/max, so outliers stop stretching the grid of the whole group.
    """

    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    max_damp_retries: int = 6
    mse_grid: bool = True

    def __post_init__(self) -> None:
        if not self.damp_percent > 0:
            raise LowbitError(f"GPTQ damp_percent must be > 0, got {self.damp_percent}")
        if self.block_size < 1:
            raise LowbitError(f"GPTQ block_size must be >= 1, got {self.block_size}")
        if self.max_damp_retries < 0:
            raise LowbitError(f"GPTQ max_damp_retries must be >= 0, got {self.max_damp_retries}")


class HessianAccumulator:
    """Running H = 2/n * sum_k x_k x_k^T over calibration inputs of one linear layer.

    Kept in float64 with the sample count, rescaling the old sum on every add, so
    batches can arrive one by one without the sum growing with n (the reference
    GPTQ scaling; the factor 2 does not change the solution, damping is relative).
    """

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.n = 0
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """Add inputs of shape [..., in_features]; every leading index is one sample (token)."""
        if x.shape[-1] != self.in_features:
            raise LowbitError(
                f"GPTQ calibration input has {x.shape[-1]} features, expected {self.in_features}"
            )
        x = x.reshape(-1, self.in_features).to(torch.float64)
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x

    def hessian(self) -> torch.Tensor:
        """The accumulated [in, in] float64 Hessian; an error if nothing was added."""
        if self.n == 0:
            raise LowbitError("GPTQ Hessian has no calibration samples; run calibration before quantizing")
        return self.H


GPTQStats = HessianAccumulator


def quantize_layer(weight: torch.Tensor, stats: object, config: GridConfig, name: str = "weight", *,
                   gptq: GPTQConfig | None = None) -> QuantizedTensor:
    """GPTQ-quantize a [out, in] weight given its input Hessian (accumulator or [in, in] tensor)."""
    gptq = gptq or GPTQConfig()
    if weight.dim() != 2:
        raise LowbitError(f"{name}: GPTQ needs a 2-D weight, got shape {tuple(weight.shape)}")
    n_in = weight.shape[1]
    H = _hessian_of(stats, n_in, name).clone()
    W = weight.detach().to(torch.float32).clone()
    if not torch.isfinite(W).all():
        raise LowbitError(f"{name}: weight contains NaN or Inf; cannot quantize")
    _handle_dead_columns(H, W)

    perm = _column_order(H, gptq.act_order)
    static = _static_params(W, config) if gptq.static_groups and config.group_size != -1 else None
    W, H = W[:, perm.to(W.device)], H[perm][:, perm]
    U = _inverse_cholesky_upper(H, gptq, name).to(W.device)
    importance = torch.diagonal(H).float().to(W.device) if gptq.mse_grid else None
    with single_thread():
        codes, scales, zeros = _gptq_loop(W, U, perm, config, gptq.block_size, static, importance)

    inv = torch.argsort(perm)
    g_idx = None
    if gptq.act_order and static is None and config.group_size != -1:
        g_idx = (inv // config.group_size).to(torch.int32)  # original column -> permuted block of columns
    return QuantizedTensor(
        codes=codes[:, inv].to(torch.uint8).contiguous(),
        scales=scales.half(),
        zeros=zeros.to(torch.uint8),
        config=config,
        g_idx=g_idx,
    )


# ---------------------------------------------------------------- preparation


def _hessian_of(stats: object, n_in: int, name: str) -> torch.Tensor:
    """Accept an accumulator (anything with .hessian()) or a raw matrix; check shape and finiteness."""
    if stats is None:
        raise LowbitError(f"{name}: GPTQ needs calibration statistics (a Hessian), got none")
    H = stats.hessian() if hasattr(stats, "hessian") else stats
    if not isinstance(H, torch.Tensor):
        raise LowbitError(f"{name}: GPTQ stats must be a HessianAccumulator or a tensor, got {type(stats).__name__}")
    if tuple(H.shape) != (n_in, n_in):
        raise LowbitError(f"{name}: GPTQ Hessian has shape {tuple(H.shape)}, expected ({n_in}, {n_in})")
    H = H.to("cpu" if H.device.type == "mps" else H.device).to(torch.float64)  # MPS has no float64
    if not torch.isfinite(H).all():
        raise LowbitError(f"{name}: GPTQ Hessian contains NaN or Inf; check the calibration inputs")
    return H


def _handle_dead_columns(H: torch.Tensor, W: torch.Tensor) -> None:
    """Inputs that are always zero carry no information: their weights cannot matter to the
    output, so zero them (exactly representable) and put 1 on the diagonal to keep H invertible."""
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead.to(W.device)] = 0.0


def _column_order(H: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Identity, or columns by descending diag(H) (stable sort, so runs are deterministic)."""
    n = H.shape[0]
    if not act_order:
        return torch.arange(n, device=H.device)
    return torch.sort(torch.diagonal(H), descending=True, stable=True).indices


def _static_params(W: torch.Tensor, cfg: GridConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All groups' scale/zero from the original weights, [out, n_groups] each (groups j // group_size)."""
    return fit_scale_zero(group_view(W, cfg), cfg)


def _inverse_cholesky_upper(H: torch.Tensor, gptq: GPTQConfig, name: str) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*I)^-1, as float32.

    Damping starts at damp_percent * mean(diag(H)) and is raised x10 while any of the
    factorizations fails; H + damp*I is positive definite for a large enough damp
    when H is a proper (PSD) Hessian, so failures past the retry limit mean the
    matrix is not one.
    """
    n = H.shape[0]
    base = gptq.damp_percent * float(torch.diagonal(H).mean())
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    damp = base
    for _ in range(gptq.max_damp_retries + 1):
        if damp > 0:
            U = _try_factor(H + damp * eye)
            if U is not None:
                return U.to(torch.float32)
        damp *= 10
    raise LowbitError(
        f"{name}: GPTQ could not factor the Hessian even with damping raised to {damp / 10:.3g} "
        f"({gptq.max_damp_retries} retries); the calibration statistics are not a valid Hessian"
    )


def _try_factor(Hd: torch.Tensor) -> torch.Tensor | None:
    """U with U^T U = Hd^-1 (U upper), or None if Hd is not numerically positive definite."""
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        return None
    # cholesky_solve against I: same result as torch.cholesky_inverse, ~30x faster on CPU in float64.
    Hinv = torch.cholesky_solve(torch.eye(Hd.shape[0], dtype=Hd.dtype, device=Hd.device), L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0 or not torch.isfinite(U).all() or bool((torch.diagonal(U) <= 0).any()):
        return None
    return U


# ---------------------------------------------------------------- the column loop


def _gptq_loop(W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor, cfg: GridConfig, block_size: int,
               static: tuple[torch.Tensor, torch.Tensor] | None, importance: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the (already permuted) columns of W in order; W is modified in place.

    Returns codes in permuted column order [out, in] and scales/zeros [out, n_groups].
    """
    out, n = W.shape
    n_groups, glen = cfg.groups_for(n)
    if static is not None:
        scales, zeros = static
    else:
        scales = torch.zeros(out, n_groups, device=W.device)
        zeros = torch.zeros(out, n_groups, device=W.device)
        if cfg.group_size == -1:  # one group per row: fit once on the whole row, as the reference does
            scales[:, 0], zeros[:, 0] = fit_scale_zero(W, cfg)
    codes = torch.zeros(out, n, dtype=torch.uint8, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        _quantize_block(W, U, i1, i2, perm, cfg, static is not None, scales, zeros, codes, importance)
    return codes, scales, zeros


def _quantize_block(W: torch.Tensor, U: torch.Tensor, i1: int, i2: int, perm: torch.Tensor, cfg: GridConfig,
                    static: bool, scales: torch.Tensor, zeros: torch.Tensor, codes: torch.Tensor,
                    importance: torch.Tensor | None = None) -> None:
    """One lazy batch: exact per-column OBS updates inside [i1, i2), one matmul for the columns after it."""
    W1 = W[:, i1:i2].clone()
    U1 = U[i1:i2, i1:i2]
    Err1 = torch.zeros_like(W1)
    for i in range(i2 - i1):
        col = i1 + i
        g = _group_of(col, perm, cfg, static)
        if _starts_dynamic_group(col, cfg, static):
            _fit_group(W, W1, Err1, U, i1, i, i2, g, cfg, scales, zeros, importance)
        w = W1[:, i]
        c = encode(w.unsqueeze(-1), scales[:, g], zeros[:, g], cfg)
        q = decode(c, scales[:, g], zeros[:, g]).squeeze(-1)
        codes[:, col] = c.squeeze(-1).to(torch.uint8)
        err = (w - q) / U1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    W[:, i2:] -= Err1 @ U[i1:i2, i2:]


def _group_of(col: int, perm: torch.Tensor, cfg: GridConfig, static: bool) -> int:
    """Group of the column at permuted position `col`.

    Static groups belong to the original column index; dynamic groups are runs of
    group_size consecutive columns in quantization order (the identity without
    act_order), which is what makes an act-order result representable by g_idx.
    """
    if cfg.group_size == -1:
        return 0
    return int(perm[col]) // cfg.group_size if static else col // cfg.group_size


def _starts_dynamic_group(col: int, cfg: GridConfig, static: bool) -> bool:
    return not static and cfg.group_size != -1 and col % cfg.group_size == 0


def _fit_group(W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor, i1: int, i: int, i2: int,
               g: int, cfg: GridConfig, scales: torch.Tensor, zeros: torch.Tensor,
               importance: torch.Tensor | None = None) -> None:
    """Fit group g's scale/zero on its columns' *current* values, i.e. including every
    correction from the columns quantized so far.

    Columns inside the block are current in W1; columns past the block still lack
    this block's pending lazy update, which is added here so the fit does not
    depend on block_size.
    """
    start = i1 + i
    end = min(start + cfg.group_size, W.shape[1])
    inside = W1[:, i:min(end, i2) - i1]
    if end > i2:
        pending = Err1[:, :i] @ U[i1:i1 + i, i2:end]
        inside = torch.cat([inside, W[:, i2:end] - pending], dim=1)
    if importance is None:
        scales[:, g], zeros[:, g] = fit_scale_zero(inside, cfg)
    else:
        scales[:, g], zeros[:, g] = fit_scale_zero_mse(inside, cfg, importance[start:end])
