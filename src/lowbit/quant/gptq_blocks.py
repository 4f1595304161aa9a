"""GPTQ targeting llama.cpp's block grids (Q8_0 ... Q6_K, IQ4_NL, IQ4_XS, and the lattice i-quants IQ2_XXS ...
IQ3_S), so the result is a standard GGUF.

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

The lattice i-quants (a group of 4 or 8 weights is one grid point, with sign bits) have no per-weight
rounding: quantize_lattice_gptq sweeps them one sign unit (8 or 4 columns) at a time in natural column
order, choosing grid points and signs jointly, then propagating each column's error (as GPTVQ does).
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
    H: torch.Tensor | None = None  # float32 [in, in] damped H in original column order, for header_refit


def factor_hessian(stats: object, n_in: int, name: str, gptq: GPTQConfig,
                   keep_hessian: bool = False) -> FactoredHessian:
    """`keep_hessian` also keeps the damped H (n_in^2 floats more), the objective of the header refit and of the
    lattice types' coordinate descent."""
    H = _hessian_of(stats, n_in, name).clone()
    dead = torch.diagonal(H) == 0
    _handle_dead_columns(H, torch.zeros(0, n_in, device=H.device))
    diag = torch.diagonal(H).float().cpu().numpy().copy()
    kept = None
    if keep_hessian:
        kept = H.float().clone()
        kept.diagonal().add_(gptq.damp_percent * float(torch.diagonal(H).mean()))
    perm = _column_order(H, gptq.act_order)
    H = H[perm][:, perm]
    return FactoredHessian(_inverse_cholesky_upper(H, gptq, name), perm, dead, diag, kept)


def quantize_block_gptq(weight: torch.Tensor, fh: FactoredHessian, btype: BlockType,
                        importance: np.ndarray | None = None, gptq: GPTQConfig = GPTQConfig()) -> BlockResult:
    """GPTQ one [out, in] weight onto `btype`; `importance` (an imatrix row) overrides diag(H) for the fits."""
    W = weight.detach().to(torch.float32).clone()
    W[:, fh.dead.to(W.device)] = 0.0
    imp = fh.diag if importance is None else np.asarray(importance, dtype=np.float32)
    n = W.shape[1]
    lazy = max(btype.block, (gptq.block_size // btype.block) * btype.block)
    if btype.search_only:
        if not bool((fh.perm.cpu() == torch.arange(n)).all()):
            raise ValueError(f"{btype.name}: GPTQ onto a lattice grid needs the natural column order (no act-order)")
        with single_thread():
            params, codes = _lattice_with_refit(W, fh, btype, imp, lazy)
        raw = btype.pack(params, codes)
        return BlockResult(btype.name, raw, torch.from_numpy(btype.dequantize(raw, n)).to(weight.device))
    static = btype.fit(W.cpu().numpy(), imp) if gptq.act_order else None
    with single_thread():
        params, codes = _scalar_with_refit(W, fh, btype, imp, lazy, static)
    raw = btype.pack(params, codes)
    return BlockResult(btype.name, raw, torch.from_numpy(btype.dequantize(raw, n)).to(weight.device))


def _scalar_with_refit(W: torch.Tensor, fh: FactoredHessian, btype: BlockType, imp: np.ndarray, lazy: int,
                       static: dict | None) -> tuple[dict, np.ndarray]:
    """The column loop; where fh keeps H and the type's header is d times integer sub-block scales, then the
    headers refitted to the output error (header_refit), one more loop at those headers, a last refit."""
    perm, inv = fh.perm.cpu(), torch.argsort(fh.perm.cpu())
    U = fh.U.to(W.device)

    def loop(headers: dict | None) -> tuple[dict, np.ndarray]:
        Wp = W[:, perm.to(W.device)].contiguous()
        codes, params = _column_loop(Wp, U, perm, btype, imp, lazy, headers)
        return params, codes.cpu()[:, inv].numpy()

    params, codes = loop(static)
    if fh.H is None or btype.header_model is None:
        return params, codes
    return _refit_rerun_refit(W, fh.H, btype, params, codes, lambda headers: loop(headers)[1])


def _refit_rerun_refit(W: torch.Tensor, H: torch.Tensor, btype: BlockType, params: dict, codes: np.ndarray,
                       rerun) -> tuple[dict, np.ndarray]:
    """Headers refitted to the output error (header_refit), `rerun(headers)` -> codes of one more sweep at them,
    a refit of those; the (params, codes) of least (W - Q) H (W - Q)^T of the two refits (the sweep at refitted
    headers can come out worse than the refit it started from: Q6_K on the real ffn_down)."""
    from lowbit.quant.header_refit import refit_headers

    first = (refit_headers(W, H, btype, params, codes), codes)
    codes = rerun(first[0])
    second = (refit_headers(W, H, btype, first[0], codes), codes)
    W64, H64 = W.cpu().to(torch.float64), H.cpu().to(torch.float64)

    def error(candidate: tuple[dict, np.ndarray]) -> float:
        q = torch.from_numpy(btype.dequantize(btype.pack(*candidate), W.shape[1])).to(torch.float64)
        return float((((W64 - q) @ H64) * (W64 - q)).sum())

    return min((first, second), key=error)


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


# -- the lattice i-quants (IQ2_XXS ... IQ3_S): a group of 4 or 8 weights is one grid point

def _lattice_with_refit(W: torch.Tensor, fh: FactoredHessian, btype: BlockType, imp: np.ndarray,
                        lazy: int) -> tuple[dict, np.ndarray]:
    """The lattice sweep; where fh keeps H, then its headers refitted to the output error (header_refit), one
    more sweep at those headers and a refit (the better of the two refits kept), then rounds of coordinate
    descent over the grid points (lattice_cd) and header refits, none of which can raise the error on the
    calibration tokens. Real layer-1 ffn_down, held-out output error vs llama.cpp+imatrix, IQ2_XS / IQ3_XXS, at
    damp 0.3: sweep 0.776x / 0.781x, refits 0.715x / 0.759x, three descent rounds 0.680x / 0.722x."""
    target = W.clone()
    params, codes = quantize_lattice_gptq(W, fh, btype, imp, lazy)
    if fh.H is None or btype.header_model is None:
        return params, codes
    from lowbit.quant.header_refit import refit_headers
    from lowbit.quant.lattice_cd import refine_lattice_codes

    params, codes = _refit_rerun_refit(
        target, fh.H, btype, params, codes,
        lambda headers: quantize_lattice_gptq(target.clone(), fh, btype, imp, lazy, headers=headers)[1])
    for _ in range(LATTICE_CD_ROUNDS):
        codes = refine_lattice_codes(target, fh.H, btype, params, codes)
        params = refit_headers(target, fh.H, btype, params, codes)
    return params, codes


# Hessian damping (fraction of mean diag H) for the lattice types, at least: their coarse grid points move the
# weights far, and with little damping GPTQ overfits the calibration tokens. The same damped H is the objective
# of the header refit and the coordinate descent after the sweep. Real layer-1 ffn_down, 16k wiki calibration
# tokens, output error vs llama.cpp's imatrix search, IQ2_XS (sweep only): damp 0.01 0.83x, 0.1 0.80x, 0.3 0.78x,
# 1.0 0.78x held out. With the refits and descent, held-out wiki / Python source / Botchan: damp 0.3 0.680x /
# 0.916x / 0.780x, 1.0 0.683x / 0.861x / 0.762x; IQ3_XXS 0.3 0.722x / 0.977x / 0.824x, 1.0 0.720x / 0.904x /
# 0.804x. The whole model says otherwise (IQ2_XS file, 16 x 512 held-out wiki KLD 0.3290 at 0.3 vs 0.3354 at
# 1.0; Botchan 0.3622 vs 0.3677), so 0.3.
LATTICE_DAMP = 0.3
# The same floor for the ~2.5-3.5 bpw scalar K-quants, whose steps are as coarse (same layer, held-out wiki, with
# the header refit, damp 0.01 -> 0.3: Q2_K 0.941x -> 0.876x, Q3_K 0.833x -> 0.763x llama.cpp's error; Botchan
# 1.034x -> 0.949x and 0.980x -> 0.871x). At 4 bits and up the default stays (Q4_K flat; IQ4_NL on the 576-wide
# attention linears is best at 0.01).
COARSE_TYPES = ("Q2_K", "Q3_K")
# Rounds of (lattice_cd's two sweeps, header refit) after the GPTQ sweep: on the real ffn_down (held out, IQ2_XS)
# 0.715x -> 0.687x, 0.682x, 0.680x llama.cpp's error; each round costs about one GPTQ sweep.
LATTICE_CD_ROUNDS = 3

def quantize_lattice_gptq(W: torch.Tensor, fh: FactoredHessian, btype: BlockType, imp: np.ndarray,
                          lazy: int, headers: dict | None = None) -> tuple[dict, np.ndarray]:
    """GPTQ onto a lattice grid: (params, codes [out, in]) for `btype.pack`.

    When the sweep reaches a super-block (256 columns), llama.cpp's own search (imatrix-weighted) fits its
    headers (d and the 4-bit sub-block scales) on the weights as updated so far, as the scalar types' default
    does (on the real layer-1 ffn_down, held out: 0.84x llama.cpp's output error vs 0.85x with the headers fitted
    up front on the original weights, IQ3_XXS). The sweep then visits one sign unit at a time (8 weights with
    folded signs, else one grid group), picks the grid points and signs nearest to the error-updated weights at
    the sub-block's fixed scale, and pushes each column's error on through U, one column at a time. Natural
    column order only (fh.perm must be the identity: a grid group is 4 or 8 adjacent columns). `headers`
    (params with search_codes, e.g. refitted ones) fixes every header up front instead; they are returned."""
    out, n = W.shape
    fitted = [headers] if headers is not None else []
    scale = torch.zeros(out, n // btype.sub, dtype=W.dtype, device=W.device)
    search = torch.zeros(out, n, dtype=torch.uint8, device=W.device)
    if headers is not None:
        scale.copy_(torch.from_numpy(btype.effective(headers)[0]))
        search.copy_(torch.from_numpy(np.asarray(headers["search_codes"]).reshape(out, n)))
    btype.tables
    Q = torch.from_numpy(btype.levels[: (btype.qmax + 1) // 2][btype.tables[0]]).to(W.device)  # [points, group]
    L = torch.from_numpy(np.asarray(btype.tables[0], dtype=np.int64)).to(W.device)
    unit = 8 if btype.fold_signs else btype.group
    codes = torch.zeros(out, n, dtype=torch.uint8, device=W.device)
    U = fh.U.to(W.device)
    for i1 in range(0, n, lazy):
        i2 = min(i1 + lazy, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(0, i2 - i1, unit):
            col = i1 + i
            if headers is None and col % btype.block == 0:  # lazy is a multiple of the block: W1 holds it all
                fitted.append(_fit_headers(W1[:, i:i + btype.block], imp[col:col + btype.block], btype,
                                           scale[:, col // btype.sub:], search[:, col:col + btype.block]))
            s = scale[:, col // btype.sub]
            c, q = _nearest_unit(W1[:, i:i + unit], s, torch.diagonal(U1)[i:i + unit] ** -2, Q, L, btype)
            live = (s > 0).unsqueeze(1)
            codes[:, col:col + unit] = torch.where(live, c, search[:, col:col + unit])
            q = torch.where(live, q, torch.zeros_like(q))
            for t in range(unit):
                err = (W1[:, i + t] - q[:, t]) / U1[i + t, i + t]
                W1[:, i + t:] -= err.unsqueeze(1) * U1[i + t, i + t:].unsqueeze(0)
                Err1[:, i + t] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    params = {k: np.concatenate([p[k] for p in fitted], axis=1) for k in fitted[0]}
    return params, codes.cpu().numpy()


def _fit_headers(w: torch.Tensor, imp: np.ndarray, btype: BlockType, scale: torch.Tensor, search: torch.Tensor
                 ) -> dict:
    """llama.cpp's search on one super-block column slice [rows, 256]: its params; writes the effective sub-block
    scales into the first columns of `scale` and the search's own codes (used where a scale is 0) into `search`."""
    p = btype.fit(w.cpu().numpy(), imp)
    s = torch.from_numpy(btype.effective(p)[0]).to(scale.device, scale.dtype)
    scale[:, :s.shape[1]] = s
    search.copy_(torch.from_numpy(np.asarray(p["search_codes"]).reshape(w.shape[0], -1)).to(search.device))
    return p


def _nearest_unit(w: torch.Tensor, s: torch.Tensor, c: torch.Tensor, Q: torch.Tensor, L: torch.Tensor,
                  btype: BlockType) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and values [rows, unit] of the grid points and signs nearest to w (column weights c = 1/U_ii^2,
    the GPTQ loss of each column's error) at scale s [rows].

    Each group takes the grid point nearest to |w| (signs follow w). With folded signs an odd count of
    negatives in the 8 is fixed at the smallest extra cost over all 8 single flips, each with its group's
    grid point re-chosen for the flipped weight (llama.cpp instead flips its least important weight)."""
    rows, unit = w.shape
    g = btype.group
    a, neg = w.abs(), w < 0
    idx, best, flip_d, flip_i = [], [], [], []
    for k in range(0, unit, g):
        ak, ck = a[:, k:k + g], c[k:k + g]
        dist = (s * s).unsqueeze(1) * ((Q * Q) @ ck).unsqueeze(0) - 2 * s.unsqueeze(1) * ((ak * ck) @ Q.T)
        d0, i0 = dist.min(1)
        idx.append(i0)
        best.append(d0)
        if btype.fold_signs:  # flipping weight j of this group: a_j -> -a_j adds 4 s c_j a_j Q[p, j]
            fd, fi = (dist.unsqueeze(1) + (4 * s.unsqueeze(1) * ck * ak).unsqueeze(2) * Q.T.unsqueeze(0)).min(2)
            flip_d.append(fd - d0.unsqueeze(1))
            flip_i.append(fi)
    index = torch.stack(idx, 1)                                         # [rows, unit / g]
    if btype.fold_signs:
        odd = neg.sum(1) % 2 == 1
        j = torch.cat(flip_d, 1).argmin(1)                              # cheapest single flip
        r = torch.nonzero(odd).squeeze(1)
        jr = j[r]
        neg[r, jr] = ~neg[r, jr]
        index[r, jr // g] = torch.cat(flip_i, 1)[r, jr]
    levels = L[index].reshape(rows, unit)
    half = (btype.qmax + 1) // 2
    codes = (levels + half * neg.long()).to(torch.uint8)
    mag = Q[index].reshape(rows, unit)
    q = s.unsqueeze(1) * mag * torch.where(neg, -1.0, 1.0)
    return codes, q
