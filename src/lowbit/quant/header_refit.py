"""Refit a GPTQ result's block headers to the layer's output error, with its codes fixed.

Why: GPTQ chooses codes one column (or grid group) at a time against block headers fitted *before* the
sweep reached the block: llama.cpp's search fits the super-block scale d and the integer sub-block scales
to the weights as updated so far, by weighted per-weight error. Once every code is fixed, the dequantization
of a sub-block is linear in its scale, so the layer's output error on the calibration tokens,

    E(row) = (w - q) H (w - q)^T,    q = d[super] * factors[ls[sub]] * level[code],

is a quadratic in the scales. This module descends it exactly: each super-block's d moves to its
least-squares value, rounded to fp16 as stored, kept only where E falls; then one sub-block at a time, every
allowed integer scale is scored in closed form and the best kept (the current one among them, so E never rises).
The residual's gradient G = (w - q) H is kept up to date, so a sweep costs one rows x n x n product, the
order of GPTQ itself.

Used for block types whose header is "fp16 d per super-block times a table of integer sub-block scales"
(BlockType.header_model): the lattice i-quants (IQ2_XXS ... IQ3_S). Real layer-1 ffn_down, 32 x 512
calibration tokens, held-out output error against llama.cpp+imatrix (tests/test_gptq_lattice.py):
IQ2_XS 0.776x (GPTQ) -> 0.727x (refit) -> 0.715x (one more sweep at the refit headers, refit again);
IQ3_XXS 0.781x -> 0.767x -> 0.759x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

F16_MAX = 65504.0


@dataclass(frozen=True)
class HeaderModel:
    """Where a block type keeps its scales, and what each stored integer sub-block scale means.

    A sub-block's scale is d * factors[i] where values[i] is what the block stores; a type with one scale per
    block (IQ4_NL, Q8_0 ...) has no sub key and a single factor 1."""

    super_key: str                  # params key: fp16 scale d, [rows, n_blocks]
    sub_key: str | None = None      # params key: integer sub-block scales, [rows, n_blocks, subs per block]
    values: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))   # stored integers, params' dtype
    factors: np.ndarray = field(default_factory=lambda: np.ones(1, np.float64))  # float64, one per value


def header_model_of(btype, values: np.ndarray) -> HeaderModel:
    """The model of a type whose _effective is d * g(stored scale): g read off the type's own _effective."""
    factors = btype._effective({"d": np.ones((1, 1), np.float32), "scales": values[None, None, :]})[0]
    return HeaderModel("d", "scales", values, np.asarray(factors, np.float64).reshape(-1))


def refit_headers(W: torch.Tensor, H: torch.Tensor, btype, params: dict, codes: np.ndarray,
                  sweeps: int = 3) -> dict:
    """params with the super- and sub-block scales refitted to minimise sum over rows of (w - q) H (w - q)^T.

    W: float [rows, n] target weights; H: [n, n] (damped) Hessian in natural column order; codes: the type's
    codes [rows, n], fixed. Returns a new params dict (other keys kept); never raises E on any row."""
    hm: HeaderModel = btype.header_model
    rows, n = W.shape
    sub, per = btype.sub, btype.block // btype.sub
    H = H.to(torch.float64).cpu()
    M = torch.from_numpy(btype.code_values(codes)).to(torch.float64)                           # [rows, n]
    d = torch.from_numpy(np.asarray(params[hm.super_key], dtype=np.float64).reshape(rows, -1).copy())
    ls = torch.from_numpy(_value_index(hm, params, rows, n // sub))
    f = torch.from_numpy(np.asarray(hm.factors, dtype=np.float64))
    s = d.repeat_interleave(per, 1) * f[ls]                                      # [rows, K]
    G = (W.to(torch.float64).cpu() - s.repeat_interleave(sub, 1) * M) @ H        # residual gradient
    curv = _sub_block_curvature(M, H, sub)
    for _ in range(sweeps):  # ending on the sub-block pass: each integer scale is then optimal given the rest
        _step_super_scales(M, H, G, s, ls, d, f, sub, per)
        if len(f) > 1:
            _sweep_sub_scales(M, H, G, s, ls, d, f, curv, sub, per)
    out = dict(params)
    out[hm.super_key] = d.numpy().astype(np.float16).reshape(np.shape(params[hm.super_key]))
    if hm.sub_key is not None:
        out[hm.sub_key] = hm.values[ls.numpy()].reshape(np.shape(params[hm.sub_key]))
    return out


def _value_index(hm: HeaderModel, params: dict, rows: int, n_sub: int) -> np.ndarray:
    """Index into hm.values of every stored sub-block scale, int64 [rows, n_sub] (zeros without a sub key)."""
    if hm.sub_key is None:
        return np.zeros((rows, n_sub), np.int64)
    stored = np.asarray(params[hm.sub_key]).reshape(rows, n_sub).astype(np.int64)
    order = np.argsort(hm.values.astype(np.int64))
    at = np.searchsorted(hm.values.astype(np.int64)[order], stored)
    return order[np.clip(at, 0, len(order) - 1)]


def _sub_block_curvature(M: torch.Tensor, H: torch.Tensor, sub: int) -> torch.Tensor:
    """m_k H_kk m_k^T per row and sub-block [rows, K]: E's second derivative in that sub-block's scale."""
    rows, n = M.shape
    K = n // sub
    Hkk = torch.stack([H[k * sub:(k + 1) * sub, k * sub:(k + 1) * sub] for k in range(K)])   # [K, sub, sub]
    Mb = M.view(rows, K, sub)
    return torch.einsum("rka,kab,rkb->rk", Mb, Hkk, Mb)


def _sweep_sub_scales(M, H, G, s, ls, d, f, curv, sub: int, per: int) -> None:
    """One pass over the sub-blocks, in place: each takes the integer scale of least E, the others fixed."""
    rows = M.shape[0]
    at = torch.arange(rows)
    for k in range(s.shape[1]):
        cols = slice(k * sub, (k + 1) * sub)
        mk = M[:, cols]
        lin = (mk * G[:, cols]).sum(1)
        delta = d[:, k // per, None] * f[None, :] - s[:, k, None]                # [rows, n_values]
        c = (curv[:, k, None] * delta * delta - 2 * delta * lin[:, None]).argmin(1)
        step = delta[at, c]
        ls[:, k] = c
        s[:, k] += step
        G -= step[:, None] * (mk @ H[cols, :])


def _step_super_scales(M, H, G, s, ls, d, f, sub: int, per: int) -> None:
    """Each super-block's d to its least-squares value (integer scales fixed), fp16-rounded, where E falls."""
    block = sub * per
    for j in range(d.shape[1]):
        cols = slice(j * block, (j + 1) * block)
        v = f[ls[:, j * per:(j + 1) * per]].repeat_interleave(sub, 1) * M[:, cols]   # dq / dd, [rows, block]
        vH = v @ H[cols, :]
        curv = (vH[:, cols] * v).sum(1)
        lin = (v * G[:, cols]).sum(1)
        target = d[:, j] + lin / torch.where(curv > 0, curv, torch.ones_like(curv))
        stored = torch.from_numpy(target.clamp(-F16_MAX, F16_MAX).numpy().astype(np.float16).astype(np.float64))
        delta = stored - d[:, j]
        # d keeps its sign (a lattice sub-block with a scale <= 0 counts as empty) and a zero d stays zero
        take = (curv > 0) & (stored * d[:, j] > 0) & (curv * delta * delta - 2 * delta * lin < 0)
        delta = torch.where(take, delta, torch.zeros_like(delta))
        d[:, j] += delta
        s[:, j * per:(j + 1) * per] = d[:, j, None] * f[ls[:, j * per:(j + 1) * per]]
        G -= delta[:, None] * vH
