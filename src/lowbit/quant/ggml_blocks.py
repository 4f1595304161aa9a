"""llama.cpp's block quantization types, vectorised in numpy and bit-compatible with ggml.

Seventeen types: the legacy Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (32-element blocks), the
k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-element super-blocks) and the
non-linear i-quants IQ4_NL (32), IQ4_XS and the grid i-quants IQ3_XXS, IQ3_S,
IQ2_XXS, IQ2_XS, IQ2_S (256; their codes are grid points of 4 or 8 weights, and
IQ2_XXS / IQ2_XS need an importance). Each is a small
`BlockType` subclass that knows four things: how llama.cpp searches the block
parameters (`fit`), how it rounds the weights once those are fixed (`codes`),
what one code is worth (`effective`), and the exact ggml byte layout
(`pack`/`unpack`). Everything runs over all blocks of a tensor at once.

Reproducing ggml bit for bit
----------------------------
ggml-quants.c is plain C compiled without fast-math or FMA contraction, so each
`a*b + c` is two float32 roundings and every sum is accumulated element by
element in index order. This module does the same: products are vectorised
(one IEEE float32 rounding each, like C), and every accumulation goes through
`seq_sum`, a Python loop over the 16/32/256 summed elements with vector adds
across all blocks, so the partial sums round exactly as the C loop's do.
`nearest_int` is ggml's own 12582912 trick (round half to even, with its
out-of-range wrap-around), fp16 conversion is round-to-nearest-even like
GGML_FP32_TO_FP16, and integer stores into uint8/int8 fields wrap like C.

Which search runs (as in ggml's `quantize_<type>` dispatch):
  * importance None: the `quantize_row_<type>_ref` path that `llama_model_quantize`
    uses without an imatrix (make_qkx2 for Q2_K/Q4_K/Q5_K, make_q3 for Q3_K,
    make_qx for Q6_K, max/min formulas for the legacy types);
  * importance given (the imatrix column means of x^2 for this tensor): the
    `quantize_row_<type>_impl` path (make_qkx3 + make_qp for Q2_K/Q4_K/Q5_K,
    weighted make_qx for Q3_K/Q6_K/Q4_0/Q5_0, make_qkx3 for Q4_1/Q5_1).
    Q8_0 ignores the imatrix, as llama.cpp does. IQ4_NL / IQ4_XS have no separate
    reference path in llama_model_quantize: quantize_iq4_nl / quantize_iq4_xs run
    with x^2 weights without an imatrix, and the grid i-quants IQ3_XXS / IQ3_S /
    IQ2_S run their one search with their own weights (x^2; IQ2_S sigma2/4 + x^2),
    as ggml_quantize_chunk does; IQ2_XXS / IQ2_XS refuse. The legacy impl paths weight
    by sigma2 = mean x^2 over the whole row, so fitting column slices of a
    legacy type with an importance is not the same as fitting the full rows
    (k-quants only look inside their own 256-element block).

Parameters and codes
--------------------
`fit` returns the block header fields, each shaped [rows, n_blocks, ...]:
``d`` (and ``dmin`` / ``m``) as float16, plus per-sub-block ``scales`` (and
``mins``) as the small integers stored in the block (Q3_K: unsigned 6-bit,
effective scale d*(s-32); Q6_K: int8). It also returns ``search_codes``
(uint8 [rows, n_blocks, block]): the codes llama.cpp's search produced before
any re-rounding. `codes(w, params)` is llama.cpp's final rounding: k-quants
re-round every weight against the stored (fp16-derived) sub-block scale and
keep the search codes only where that scale is exactly 0 (ggml's
``if (!d) continue;``); legacy types never re-round in llama.cpp (their codes
come from the unrounded float32 scale), so their final codes *are*
``search_codes``. Without ``search_codes`` (params from `unpack`, or built by a
caller) `codes` rounds to the nearest level of the stored grid and uses code
`zero` where a scale is 0.

Codes are uint8 in [qmin, qmax]; a weight dequantizes as
``scale * code_values(code) + bias`` with the (scale, bias) of `effective`, which
is bit-identical to ``gguf.quants.dequantize`` (and ggml's dequantize_row_*) for
every code. code_values is ``code - zero`` on the linear grids and the type's
level table (`levels`, kvalues_iq4nl) on the i-quants, whose final codes also come
from the search (like the legacy types) and whose fallback rounding is ggml's
best_index_int8 (`best_index`). Symmetric types get bias -0.0, which leaves every
float32 unchanged. Q8_0 stores its int8 value q as code q + 128.

Residual differences
--------------------
None are known for finite inputs: the tests compare every block against
llama.cpp's own quantizer, with and without an imatrix. Signed-zero choices
in min/max over blocks containing both +0.0 and -0.0 follow numpy's reduction
rather than ggml's first-seen rule; they can only flip the sign bit of an
fp16 zero.
"""

from __future__ import annotations

import gguf
import numpy as np

from lowbit.errors import LowbitError

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves round-half-even(x) in the low mantissa bits


# ---------------------------------------------------------------- C float / int semantics


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even via float32 + 12582912, as int32 (wraps like C outside +-2**22)."""
    bits = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def c_trunc(v: np.ndarray) -> np.ndarray:
    """C float -> int conversion (truncation toward zero) for in-range values."""
    with np.errstate(invalid="ignore"):
        return np.trunc(v).astype(np.int32)


def c_roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) as int32; computed without the x+0.5 rounding trap."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= F32(0.5), t + np.sign(v), t).astype(np.int32)


def as_uint8(v: np.ndarray) -> np.ndarray:
    """Store an int into a C uint8_t (modulo 256)."""
    return (np.asarray(v).astype(np.int64) & 0xFF).astype(np.uint8)


def as_int8(v: np.ndarray) -> np.ndarray:
    """Store an int into a C int8_t (two's complement wrap)."""
    return as_uint8(v).view(np.int8)


def to_fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even (overflow to inf)."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=F32).astype(np.float16)


def seq_sum(terms: np.ndarray, first: bool = False) -> np.ndarray:
    """Sum over axis 0 in index order with one float32 rounding per addition.

    Mirrors a C loop ``float s = 0; for (i...) s += t[i];`` (or, with first=True,
    ``float s = t[0]; for (i = 1...)``) for every lane of axis 1.. at once.
    """
    acc = terms[0].astype(F32, copy=True) if first else np.zeros(terms.shape[1:], F32) + terms[0]
    for t in terms[1:]:
        acc += t
    return acc


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per lane, the first element of largest magnitude; +0 when all are zero.

    ggml: ``amax = 0; for (...) if (ax > amax) { amax = ax; max = x[i]; }``.
    """
    idx = np.argmax(np.abs(x), axis=0)
    picked = np.take_along_axis(x, idx[None], axis=0)[0]
    return np.where(np.abs(picked) > 0, picked, F32(0))


def lanes(x: np.ndarray, size: int) -> np.ndarray:
    """[..., k*size] -> [size, N]: one lane per group of `size` consecutive values, element axis first."""
    return np.ascontiguousarray(np.asarray(x, dtype=F32).reshape(-1, size).T)


# ---------------------------------------------------------------- ggml's parameter searches (lane-vectorised)


def search_symmetric(x: np.ndarray, nmax: int, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants with rmse_type 1: scale [N] and codes [n, N] in [0, 2*nmax-1].

    x, weights: [n, N]; weights None means x^2. All-zero lanes give scale 0 and codes 0.
    """
    mx = signed_absmax(x)
    w = x * x if weights is None else weights
    wx = w * x

    def trial(iscale):
        level = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
        return level, seq_sum(wx * level), seq_sum(w * level * level)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        level, sumlx, suml2 = trial(F32(-nmax) / mx)
        best_level = level
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            level, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            best_level = np.where(better, level, best_level)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    zero = np.abs(mx) < GROUP_MAX_EPS
    codes = np.where(zero, 0, best_level.astype(np.int32) + nmax)
    return np.where(zero, F32(0), scale).astype(F32), codes


def refine_levels(x: np.ndarray, w: np.ndarray, level: np.ndarray, round_level, positive_scales: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's coordinate descent over the codes, shared by make_q3_quants and make_qp_quants.

    Up to 5 passes; in each, element i in turn moves to the level that the least-squares scale of the
    other elements rounds it to, when that raises sumlx^2 / suml2. `level` [n, N] (float32, updated
    in place when no wrap is needed) holds the codes. positive_scales selects make_qp_quants' flavour: it skips an
    element unless the leave-one-out suml2 is positive, and stores codes in a uint8 (wrapping);
    make_q3_quants instead requires the new suml2 to be positive. Returns (level, sumlx, suml2).
    """
    wx = w * x
    sumlx = seq_sum(wx * level)
    suml2 = seq_sum(w * level * level)
    if positive_scales:  # the sums above saw the levels as ints; the uint8_t copy wraps negatives
        level = (level.astype(np.int32) & 0xFF).astype(F32)
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            old = level[i]
            slx = sumlx - wx[i] * old
            sl2 = suml2 - w[i] * old * old
            new = round_level(x[i] * sl2 / slx)
            newf = new.astype(F32)
            nslx = slx + wx[i] * newf
            nsl2 = sl2 + w[i] * newf * newf
            take = (slx > 0) & ((sl2 > 0) if positive_scales else (nsl2 > 0)) & (newf != old) & (
                nslx * nslx * suml2 > sumlx * sumlx * nsl2)
            if take.any():
                changed = True
                level[i] = np.where(take, (new & 0xFF).astype(F32) if positive_scales else newf, old)
                sumlx = np.where(take, nslx, sumlx)
                suml2 = np.where(take, nsl2, suml2)
        if not changed:  # a pass without changes leaves the state as it was: every lane is done
            break
    return level, sumlx, suml2


def search_symmetric_rmse(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants with do_rmse: x^2-weighted codes refined one element at a time (Q3_K reference path)."""
    mx = signed_absmax(x)

    def round_level(v):
        return np.clip(nearest_int(v), -nmax, nmax - 1)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        level = round_level((F32(-nmax) / mx) * x).astype(F32)
        level, sumlx, suml2 = refine_levels(x, x * x, level, round_level, positive_scales=False)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    zero = np.abs(mx) < GROUP_MAX_EPS
    codes = np.where(zero, 0, level.astype(np.int32) + nmax)
    return np.where(zero, F32(0), scale), codes


def search_affine(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                  use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants / make_qkx3_quants: (scale [N], the_min [N] (>= 0, dequant = scale*L - the_min), codes [n, N]).

    Each trial re-rounds with the current best min, exactly as ggml's loop does.
    """
    lo0 = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    sum_w = seq_sum(weights, first=True)
    sum_x = seq_sum(weights * x, first=True)

    def error(scale, lo, level):
        diff = scale * level + lo - x
        return seq_sum(weights * (np.abs(diff) if use_mad else diff * diff))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lo = lo0
        iscale = F32(nmax) / (hi - lo)
        scale = F32(1) / iscale
        best_level = np.clip(nearest_int(iscale * (x - lo)), 0, nmax).astype(F32)
        best = error(scale, lo, best_level)
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo)
            level = np.clip(nearest_int(iscale * (x - lo)), 0, nmax).astype(F32)
            wl = weights * level
            sum_l = seq_sum(wl)
            sum_l2 = seq_sum(wl * level)
            sum_xl = seq_sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            this_min = np.where(clamp, F32(0), this_min)
            cur = error(this_scale, this_min, level)
            better = (det > 0) & (cur < best)
            best_level = np.where(better, level, best_level)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    flat = hi == lo0
    codes = np.where(flat, 0, best_level.astype(np.int32))
    return np.where(flat, F32(0), scale).astype(F32), -np.where(flat, lo0, lo).astype(F32), codes


def search_positive(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: weighted scale for non-negative values [n, N] onto 0..nmax, and the codes as ggml
    stores them (uint8 values, returned as int32)."""
    mx = np.maximum(x.max(axis=0), F32(0))

    def mse(scale, level):
        diff = x - scale * level
        return seq_sum(weights * diff * diff)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / mx
        best = mse(F32(1) / iscale, (nearest_int(iscale * x) & 0xFF).astype(F32))
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_s = (F32(0.1) * F32(step) + F32(nmax)) / mx
            cur = mse(F32(1) / iscale_s, np.minimum(nmax, nearest_int(iscale_s * x)).astype(F32))
            better = cur < best
            best = np.where(better, cur, best)
            iscale = np.where(better, iscale_s, iscale)
        level = np.minimum(nmax, nearest_int(iscale * x)).astype(F32)
        level, sumlx, suml2 = refine_levels(x, weights, level, lambda v: np.minimum(nmax, nearest_int(v)),
                                            positive_scales=True)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    zero = mx < GROUP_MAX_EPS
    return np.where(zero, F32(0), scale), np.where(zero, 0, level.astype(np.int32))


# ---------------------------------------------------------------- lane-major entry points

# The block types call these with lanes as rows ([N lanes, n], a free reshape of the weights). They run the
# compiled port (lowbit.quant.native, the same arithmetic, byte-identical) when it can be built on this host,
# else the numpy reference above on the transposed lanes. LOWBIT_NATIVE=0 forces the reference.


def _native():
    from lowbit.quant import native

    return native if native.available() else None


def _cols(a: np.ndarray | None) -> np.ndarray | None:
    """[N, n] rows of lanes -> the reference's [n, N] layout."""
    return None if a is None else lanes(a, np.shape(a)[-1])


def rows_symmetric(x: np.ndarray, nmax: int, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """search_symmetric over rows of lanes: (scale [N], codes [N, n])."""
    nat = _native()
    if nat:
        return nat.search_symmetric(x, nmax, weights)
    scale, codes = search_symmetric(_cols(x), nmax, _cols(weights))
    return scale, codes.T


def rows_symmetric_rmse(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    nat = _native()
    if nat:
        return nat.search_symmetric_rmse(x, nmax)
    scale, codes = search_symmetric_rmse(_cols(x), nmax)
    return scale, codes.T


def rows_affine(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nat = _native()
    if nat:
        return nat.search_affine(x, weights, nmax, rmin, rdelta, nstep, use_mad)
    scale, the_min, codes = search_affine(_cols(x), _cols(weights), nmax, rmin, rdelta, nstep, use_mad)
    return scale, the_min, codes.T


def rows_positive(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nat = _native()
    if nat:
        return nat.search_positive(x, nmax, weights)
    scale, codes = search_positive(_cols(x), nmax, _cols(weights))
    return scale, codes.T


def rows_sum(a: np.ndarray, first: bool = False) -> np.ndarray:
    """seq_sum of every row of [N, n]: one float32 rounding per addition, in index order."""
    nat = _native()
    if nat:
        return nat.row_sum(a, first)
    return seq_sum(_cols(a), first)


# ---------------------------------------------------------------- bit packing


def pack_bits(vals: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack the fields along `axis` into bytes: field i lands at bit offset bits*i."""
    v = np.moveaxis(np.asarray(vals).astype(np.uint8) & np.uint8((1 << bits) - 1), axis, -1)
    shifts = (np.arange(v.shape[-1]) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(v << shifts, axis=-1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """Inverse of pack_bits: a new axis of `count` fields inserted at `axis`."""
    shifts = (np.arange(count) * bits).astype(np.uint8)
    v = (np.asarray(packed, dtype=np.uint8)[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return np.moveaxis(v, -1, axis)


def fp16_bytes(h: np.ndarray) -> np.ndarray:
    """float16 [B] -> little-endian bytes [B, 2]."""
    return np.ascontiguousarray(np.asarray(h, dtype=np.float16).astype("<f2")).view(np.uint8).reshape(-1, 2)


def fp16_from_bytes(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(np.float16)


def pack_k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and mins [B, 8] -> 12 bytes (ggml's get_scale_min_k4 layout)."""
    sc, mn = np.asarray(sc).astype(np.int32), np.asarray(mn).astype(np.int32)
    return np.concatenate([
        as_uint8(sc[:, :4] | ((sc[:, 4:] >> 4) << 6)),
        as_uint8(mn[:, :4] | ((mn[:, 4:] >> 4) << 6)),
        as_uint8((sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)),
    ], axis=1)


def unpack_k4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi, mix = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([lo & 63, (mix & 0xF) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], axis=1)
    return sc.astype(np.uint8), mn.astype(np.uint8)


def pack_q3_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen 6-bit scales [B, 16] -> 12 bytes (low nibbles in 0..7, high 2-bit pairs in 8..11)."""
    s = np.asarray(s).astype(np.uint8)
    low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    high = pack_bits((s >> 4).reshape(-1, 4, 4), 2, axis=1)
    return np.concatenate([low, high], axis=1)


def unpack_q3_scales(b: np.ndarray) -> np.ndarray:
    low = np.concatenate([b[:, :8] & 0xF, b[:, :8] >> 4], axis=1)
    high = unpack_bits(b[:, 8:12], 2, 4, axis=1).reshape(-1, 16)
    return (low | (high << 4)).astype(np.uint8)


# ---------------------------------------------------------------- the block types


CHUNK_ELEMENTS = 1 << 16  # weights per row chunk of quantize/dequantize (see BlockType.quantize)


class BlockType:
    """One ggml block quantization type; see the module docstring for the conventions."""

    name: str = ""
    ggml_type: gguf.GGMLQuantizationType
    block: int = 32
    sub: int = 32
    qmin: int = 0
    qmax: int = 0
    zero: int = 0
    requantizes = False                 # k-quants re-round against the stored scales
    levels: np.ndarray | None = None    # float32 value of each code on a non-linear grid (i-quants)
    layout: tuple[tuple[str, int], ...] = ()  # (field, bytes) in ggml struct order
    needs_importance = False            # refuses to fit without an imatrix row (llama.cpp's IQ2)
    search_only = False                 # codes are grid points of several weights: no scalar rounding (AutoRound
    #                                     keeps the search; GPTQ sweeps whole groups: quantize_lattice_gptq)
    header_model = None                 # a HeaderModel where the header is d * table[ls] (header_refit)

    @property
    def bytes_per_block(self) -> int:
        return sum(size for _, size in self.layout)

    # -- public API

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Block parameters by llama.cpp's own search (ref path, or imatrix path when `importance` [n] is given).

        w: float32 [rows, n], n a multiple of `block`. Every returned array is [rows, n_blocks, ...], so
        fits of column slices on block boundaries concatenate along axis 1.
        """
        x = self._blocks(w)
        qw = None
        if importance is not None:
            imp = np.asarray(importance, dtype=F32).reshape(-1)
            if imp.size != w.shape[1]:
                raise LowbitError(f"{self.name}: importance has {imp.size} values for a tensor {w.shape[1]} wide; "
                                  "pass the imatrix column means of this tensor")
            qw = np.broadcast_to(imp.reshape(1, -1, self.block), x.shape)
        params = self._fit(x, qw)
        rows, nb = x.shape[:2]
        return {k: np.asarray(v).reshape(rows, nb, *np.shape(v)[1:]) for k, v in params.items()}

    def codes(self, w: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
        """llama.cpp's final codes for w given params: uint8 [rows, n] (see the module docstring)."""
        x = self._blocks(w)
        rows, nb = x.shape[:2]
        search = params.get("search_codes")
        if search is not None and not self.requantizes:
            return np.asarray(search, dtype=np.uint8).reshape(rows, -1)
        scale, bias = self.effective(params)
        per = self.block // self.sub
        s = scale.reshape(rows, nb, per, 1)
        b = bias.reshape(rows, nb, per, 1)
        xs = x.reshape(rows, nb, per, self.sub)
        if self.levels is not None:  # non-linear grid: ggml's nearest level of x / scale
            return self._nearest_levels(xs, s).astype(np.uint8).reshape(rows, -1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            q = np.clip(nearest_int((xs - b) / s) + self.zero, self.qmin, self.qmax)
        fallback = self.zero if search is None else np.asarray(search).reshape(xs.shape)
        return np.where(s == 0, fallback, q).astype(np.uint8).reshape(rows, -1)

    def code_values(self, codes: np.ndarray) -> np.ndarray:
        """What each code is worth before the sub-block scale, float32: code - zero on a linear grid,
        the type's table (`levels`) on a non-linear one. A weight dequantizes to scale * value + bias."""
        if self.levels is not None:
            return self.levels[np.asarray(codes, dtype=np.intp)]
        return np.asarray(codes).astype(F32) - F32(self.zero)

    def effective(self, params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(scale, bias) float32 [rows, n // sub]: a code dequantizes, in float32, to exactly
        scale * code_values(code) + bias, the value ggml and gguf-py decode from the packed block."""
        scale, bias = self._effective(params)
        rows = scale.shape[0]
        return scale.astype(F32).reshape(rows, -1), bias.astype(F32).reshape(rows, -1)

    def pack(self, params: dict[str, np.ndarray], codes: np.ndarray) -> np.ndarray:
        """ggml block bytes uint8 [rows, n_blocks * bytes_per_block] from header params and codes [rows, n]."""
        codes = np.asarray(codes)
        rows, n = codes.shape
        if codes.size and (codes.min() < self.qmin or codes.max() > self.qmax):
            raise LowbitError(f"{self.name}: codes must lie in [{self.qmin}, {self.qmax}], "
                              f"got [{codes.min()}, {codes.max()}]")
        nb = n // self.block
        flat = {k: np.asarray(v).reshape(rows * nb, *np.shape(v)[2:]) for k, v in params.items()}
        fields = self._encode(flat, codes.reshape(rows * nb, self.block).astype(np.uint8))
        out = np.concatenate([fields[name] for name, _ in self.layout], axis=1)
        return out.reshape(rows, nb * self.bytes_per_block)

    def unpack(self, raw: np.ndarray, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Inverse of pack: (header params [rows, n_blocks, ...], codes uint8 [rows, n]) from rows of n values."""
        if n % self.block:
            raise LowbitError(f"{self.name}: row length {n} is not a multiple of the {self.block}-element block")
        raw = np.asarray(raw, dtype=np.uint8)
        nb = n // self.block
        flat = raw.reshape(-1, self.bytes_per_block)
        rows = flat.shape[0] // nb
        fields, off = {}, 0
        for name, size in self.layout:
            fields[name] = flat[:, off:off + size]
            off += size
        params, codes = self._decode(fields)
        return ({k: v.reshape(rows, nb, *v.shape[1:]) for k, v in params.items()},
                codes.astype(np.uint8).reshape(rows, n))

    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """llama.cpp's bytes for w: pack(p, codes(w, p)) with p = fit(w, importance).

        Rows are independent, so a large tensor goes through in row chunks of about CHUNK_ELEMENTS:
        the search's temporaries (a few dozen arrays the chunk's size) then stay in cache instead of
        streaming through RAM, and never grow with the tensor."""
        w = np.asarray(w, dtype=F32)
        rows = w.shape[0] if w.ndim == 2 else 0
        step = max(1, CHUNK_ELEMENTS // max(1, w.shape[-1])) if w.ndim == 2 else 0
        if rows <= step or not rows:
            return self._quantize_rows(w, importance)
        out = np.empty((rows, (w.shape[1] // self.block) * self.bytes_per_block), np.uint8)
        for start in range(0, rows, step):
            out[start:start + step] = self._quantize_rows(w[start:start + step], importance)
        return out

    def _quantize_rows(self, w: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        params = self.fit(w, importance)
        return self.pack(params, self.codes(w, params))

    def dequantize(self, raw: np.ndarray, n: int) -> np.ndarray:
        """float32 [rows, n], bit-identical to gguf.quants.dequantize."""
        raw = np.asarray(raw, dtype=np.uint8)
        step = max(1, CHUNK_ELEMENTS // max(1, n))
        if raw.ndim == 2 and raw.shape[0] > step:
            return np.concatenate([self._dequantize_rows(raw[i:i + step], n) for i in range(0, raw.shape[0], step)])
        return self._dequantize_rows(raw, n)

    def _dequantize_rows(self, raw: np.ndarray, n: int) -> np.ndarray:
        params, codes = self.unpack(raw, n)
        scale, bias = self.effective(params)
        rows = codes.shape[0]
        q = self.code_values(codes.reshape(rows, -1, self.sub))
        return (scale[..., None] * q + bias[..., None]).reshape(rows, n)

    # -- shared pieces

    def _blocks(self, w: np.ndarray) -> np.ndarray:
        w = np.asarray(w, dtype=F32)
        if w.ndim != 2 or w.shape[1] % self.block:
            raise LowbitError(f"{self.name}: needs a 2-D [rows, n] weight with n a multiple of {self.block}, "
                              f"got shape {tuple(w.shape)}")
        return w.reshape(w.shape[0], -1, self.block)

    def _fit(self, x: np.ndarray, qw: np.ndarray | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _nearest_levels(self, xs: np.ndarray, scale: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _effective(self, params):
        raise NotImplementedError

    def _encode(self, p: dict[str, np.ndarray], codes: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _decode(self, fields: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"BlockType({self.name})"


def _neg_zero(like: np.ndarray) -> np.ndarray:
    """Bias for symmetric types: -0.0 leaves every float32 (including -0.0) unchanged when added."""
    return np.full(np.shape(like), -0.0, dtype=F32)


def _row_sigma2(x: np.ndarray) -> np.ndarray:
    """Legacy imatrix paths: sum of x^2 over each whole row, in order, divided by the row length -> [rows, 1, 1]."""
    rows = x.shape[0]
    flat = x.reshape(rows, -1)
    return (rows_sum(flat * flat) / F32(flat.shape[1])).reshape(rows, 1, 1)


def _block_sum_x2(x: np.ndarray) -> np.ndarray:
    """k-quant imatrix paths: sum of x^2 over each 256-element block, in order -> [rows, nb, 1]."""
    flat = x.reshape(-1, QK_K)
    return rows_sum(flat * flat).reshape(*x.shape[:2], 1)


def _imatrix_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """ggml's imatrix weighting qw[j] * sqrt(sigma2 + x[j]^2)."""
    return qw * np.sqrt(sigma2 + x * x)


class _Legacy(BlockType):
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: 32-element blocks, one fp16 scale (and min), no re-rounding."""

    block = sub = 32
    bits = 4
    affine = False  # Q4_1 / Q5_1 carry a min

    def __init__(self):
        self.qmax = (1 << self.bits) - 1
        self.zero = 0 if self.affine else 1 << (self.bits - 1)
        head = [("d", 2)] + ([("m", 2)] if self.affine else [])
        body = [("qh", 4)] if self.bits == 5 else []
        body.append(("qs", 32 * self.bits // 8 if self.bits == 8 else 16))
        self.layout = tuple(head + body)

    def _fit(self, x, qw):
        nmax = 1 << (self.bits - 1)
        if qw is None or self.bits == 8:
            return self._fit_ref(x)
        weight = _imatrix_weights(x, qw, _row_sigma2(x))
        xr, wr = x.reshape(-1, 32), weight.reshape(-1, 32)
        if self.affine:
            d, the_min, codes = rows_affine(xr, wr, self.qmax, -0.9, 0.05, 36, False)
            params = {"d": to_fp16(d), "m": to_fp16(-the_min)}
        else:
            d, codes = rows_symmetric(xr, nmax, wr)
            params = {"d": to_fp16(d)}
        params["search_codes"] = codes.astype(np.uint8)
        return params

    def _fit_ref(self, x):
        xb = x.reshape(-1, 32)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.bits == 8:
                d = np.abs(xb).max(axis=1) / F32(127)
                inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
                q = c_roundf(xb * inv[:, None]) + 128
                return {"d": to_fp16(d), "search_codes": as_uint8(q)}
            if self.affine:
                lo, hi = xb.min(axis=1), xb.max(axis=1)
                d = (hi - lo) / F32(self.qmax)
                inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
                q = c_trunc((xb - lo[:, None]) * inv[:, None] + F32(0.5))
                return {"d": to_fp16(d), "m": to_fp16(lo), "search_codes": np.clip(q, 0, self.qmax).astype(np.uint8)}
            d = signed_absmax(xb.T) / F32(-self.zero)
            inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
            q = as_int8(c_trunc(xb * inv[:, None] + F32(self.zero + 0.5))).astype(np.int32)
            return {"d": to_fp16(d), "search_codes": np.clip(q, 0, self.qmax).astype(np.uint8)}

    def _effective(self, params):
        d = np.asarray(params["d"]).astype(F32)
        return d, (np.asarray(params["m"]).astype(F32) if self.affine else _neg_zero(d))

    @property
    def header_model(self):
        """One fp16 d per block (header_refit); none for Q4_1 / Q5_1, whose min is a second, additive scale."""
        from lowbit.quant.header_refit import HeaderModel

        return None if self.affine else HeaderModel("d")

    def _encode(self, p, codes):
        out = {"d": fp16_bytes(p["d"])}
        if self.affine:
            out["m"] = fp16_bytes(p["m"])
        if self.bits == 8:
            out["qs"] = codes ^ np.uint8(0x80)
            return out
        out["qs"] = pack_bits(codes.reshape(-1, 2, 16), 4, axis=1)
        if self.bits == 5:
            out["qh"] = pack_bits((codes >> 4).reshape(-1, 4, 8), 1, axis=2)
        return out

    def _decode(self, f):
        params = {"d": fp16_from_bytes(f["d"])}
        if self.affine:
            params["m"] = fp16_from_bytes(f["m"])
        if self.bits == 8:
            return params, f["qs"] ^ np.uint8(0x80)
        codes = unpack_bits(f["qs"], 4, 2, axis=1).reshape(-1, 32)
        if self.bits == 5:
            codes = codes | (unpack_bits(f["qh"], 1, 8, axis=2).reshape(-1, 32) << 4)
        return params, codes


class Q8_0(_Legacy):
    name, ggml_type, bits = "Q8_0", gguf.GGMLQuantizationType.Q8_0, 8

    def __init__(self):
        super().__init__()
        self.zero = 128  # int8 value q is stored as code q + 128


class Q4_0(_Legacy):
    name, ggml_type, bits = "Q4_0", gguf.GGMLQuantizationType.Q4_0, 4


class Q4_1(_Legacy):
    name, ggml_type, bits, affine = "Q4_1", gguf.GGMLQuantizationType.Q4_1, 4, True


class Q5_0(_Legacy):
    name, ggml_type, bits = "Q5_0", gguf.GGMLQuantizationType.Q5_0, 5


class Q5_1(_Legacy):
    name, ggml_type, bits, affine = "Q5_1", gguf.GGMLQuantizationType.Q5_1, 5, True


class _KQuant(BlockType):
    """256-element super-blocks whose codes are re-rounded against the stored scales."""

    block = QK_K
    requantizes = True

    def _sub_rows(self, a: np.ndarray) -> np.ndarray:
        """[rows, nb, block] -> one row per sub-block [rows * nb * block / sub, sub] (a view)."""
        return np.asarray(a, dtype=F32).reshape(-1, self.sub)

    def _block_codes(self, codes: np.ndarray, x: np.ndarray) -> np.ndarray:
        return codes.reshape(x.shape[0] * x.shape[1], self.block).astype(np.uint8)

    def _per_sub(self, v: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Lane vector [N sub-blocks] -> [B, block // sub]."""
        return v.reshape(x.shape[0] * x.shape[1], self.block // self.sub)


class _AffineK(_KQuant):
    """Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins, dequant d*sc*q - dmin*m."""

    sub = 32
    bits = 4
    ref_search = (-1.0, 0.1, 20)

    def __init__(self):
        self.qmax = (1 << self.bits) - 1
        high = (("qh", 32),) if self.bits == 5 else ()
        self.layout = (("d", 2), ("dmin", 2), ("scales", 12)) + high + (("qs", 128),)

    def _fit(self, x, qw):
        xr = self._sub_rows(x)
        if qw is None:
            av_x = np.sqrt(rows_sum(xr * xr) / F32(32))
            weights = av_x[:, None] + np.abs(xr)
            rmin, rdelta, nstep = self.ref_search
            scales, mins, codes = rows_affine(xr, weights, self.qmax, rmin, rdelta, nstep, False)
            scales, mins = self._per_sub(scales, x), self._per_sub(mins, x)
            max_scale = np.maximum(scales.max(axis=1), F32(0))
            max_min = np.maximum(mins.max(axis=1), F32(0))
            with np.errstate(divide="ignore"):
                inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
                inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
            ls = np.minimum(63, as_uint8(nearest_int(inv_scale[:, None] * scales)))
            lm = np.minimum(63, as_uint8(nearest_int(inv_min[:, None] * mins)))
            d, dmin = max_scale / F32(63), max_min / F32(63)
        else:
            sigma2 = F32(2) * _block_sum_x2(x) / F32(QK_K)
            weights = self._sub_rows(_imatrix_weights(x, qw, sigma2))
            sw = self._per_sub(rows_sum(weights), x)
            scales, mins, codes = rows_affine(xr, weights, self.qmax, -0.9, 0.05, 36, False)
            d, ls = rows_positive(self._per_sub(scales, x), 63, sw)
            dmin, lm = rows_positive(self._per_sub(mins, x), 63, sw)
            if self.bits == 5:  # quantize_row_q5_K_impl clamps, the q4_K one does not
                ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        sc, mn = unpack_k4_scales(pack_k4_scales(ls, lm))
        return {"d": to_fp16(d), "dmin": to_fp16(dmin), "scales": sc, "mins": mn,
                "search_codes": self._block_codes(codes, x)}

    def _effective(self, p):
        d = np.asarray(p["d"]).astype(F32)[..., None]
        dmin = np.asarray(p["dmin"]).astype(F32)[..., None]
        return d * np.asarray(p["scales"]).astype(F32), -(dmin * np.asarray(p["mins"]).astype(F32))

    def _encode(self, p, codes):
        out = {"d": fp16_bytes(p["d"]), "dmin": fp16_bytes(p["dmin"]),
               "scales": pack_k4_scales(p["scales"], p["mins"]),
               "qs": pack_bits(codes.reshape(-1, 4, 2, 32), 4, axis=2).reshape(-1, 128)}
        if self.bits == 5:
            out["qh"] = pack_bits((codes >> 4).reshape(-1, 8, 32), 1, axis=1)
        return out

    def _decode(self, f):
        sc, mn = unpack_k4_scales(f["scales"])
        codes = unpack_bits(f["qs"].reshape(-1, 4, 32), 4, 2, axis=2).reshape(-1, QK_K)
        if self.bits == 5:
            codes = codes | (unpack_bits(f["qh"], 1, 8, axis=1).reshape(-1, QK_K) << 4)
        return {"d": fp16_from_bytes(f["d"]), "dmin": fp16_from_bytes(f["dmin"]), "scales": sc, "mins": mn}, codes


class Q4_K(_AffineK):
    name, ggml_type, bits, ref_search = "Q4_K", gguf.GGMLQuantizationType.Q4_K, 4, (-1.0, 0.1, 20)


class Q5_K(_AffineK):
    name, ggml_type, bits, ref_search = "Q5_K", gguf.GGMLQuantizationType.Q5_K, 5, (-0.5, 0.1, 15)


class Q2_K(_KQuant):
    """16 sub-blocks of 16 with 4-bit scales and mins: dequant d*sc*q - dmin*m, q in 0..3."""

    name, ggml_type = "Q2_K", gguf.GGMLQuantizationType.Q2_K
    sub, qmax = 16, 3
    layout = (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2))

    def _fit(self, x, qw):
        xr = self._sub_rows(x)
        if qw is None:
            scales, mins, codes = rows_affine(xr, np.abs(xr), 3, -0.5, 0.1, 15, True)
            scales, mins = self._per_sub(scales, x), self._per_sub(mins, x)
            max_scale = np.maximum(scales.max(axis=1), F32(0))
            max_min = np.maximum(mins.max(axis=1), F32(0))
            with np.errstate(divide="ignore", invalid="ignore"):
                ls = np.where(max_scale[:, None] > 0, nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
                lm = np.where(max_min[:, None] > 0, nearest_int((F32(15) / max_min)[:, None] * mins), 0)
            d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
            dmin = np.where(max_min > 0, max_min / F32(15), F32(0))
        else:
            sigma2 = _block_sum_x2(x) / F32(QK_K)
            weights = self._sub_rows(_imatrix_weights(x, qw, sigma2))
            sw = self._per_sub(rows_sum(weights), x)
            scales, mins, codes = rows_affine(xr, weights, 3, -0.9, 0.05, 36, False)
            d, ls = rows_positive(self._per_sub(scales, x), 15, sw)
            dmin, lm = rows_positive(self._per_sub(mins, x), 15, sw)
        byte = as_uint8(as_uint8(ls).astype(np.int32) | (lm.astype(np.int32) << 4))
        return {"d": to_fp16(d), "dmin": to_fp16(dmin), "scales": byte & np.uint8(0xF), "mins": byte >> 4,
                "search_codes": self._block_codes(codes, x)}

    _effective = _AffineK._effective

    def _encode(self, p, codes):
        scales = np.asarray(p["scales"]).astype(np.uint8)
        return {"scales": (scales & np.uint8(0xF)) | (np.asarray(p["mins"]).astype(np.uint8) << 4),
                "qs": pack_bits(codes.reshape(-1, 2, 4, 32), 2, axis=2).reshape(-1, 64),
                "d": fp16_bytes(p["d"]), "dmin": fp16_bytes(p["dmin"])}

    def _decode(self, f):
        codes = unpack_bits(f["qs"].reshape(-1, 2, 32), 2, 4, axis=2).reshape(-1, QK_K)
        return {"d": fp16_from_bytes(f["d"]), "dmin": fp16_from_bytes(f["dmin"]),
                "scales": f["scales"] & np.uint8(0xF), "mins": f["scales"] >> 4}, codes


class _SymmetricK(_KQuant):
    """Q3_K / Q6_K: 16 sub-blocks of 16, one fp16 d and integer sub-block scales, dequant d*sc*(code - zero)."""

    sub = 16
    scale_offset = 0  # stored sub-block scale s means s - scale_offset (Q3_K stores 6-bit s + 32)

    def _pick_block_scale(self, scales: np.ndarray) -> np.ndarray:
        """ggml: the sub-block scale of largest magnitude (first one on ties), per block."""
        return signed_absmax(scales.T)

    def _effective(self, p):
        d = np.asarray(p["d"]).astype(F32)[..., None]
        signed = np.asarray(p["scales"]).astype(np.int8) - np.int8(self.scale_offset)
        scale = d * signed.astype(F32)
        return scale, _neg_zero(scale)

    @property
    def header_model(self):
        """fp16 d times a 6-bit (Q3_K, stored + 32) or 8-bit (Q6_K) signed sub-block scale (header_refit)."""
        from lowbit.quant.header_refit import header_model_of

        values = np.arange(64, dtype=np.uint8) if self.scale_offset else np.arange(-128, 128).astype(np.int8)
        return header_model_of(self, values)


class Q3_K(_SymmetricK):
    name, ggml_type = "Q3_K", gguf.GGMLQuantizationType.Q3_K
    qmax, zero, scale_offset = 7, 4, 32
    layout = (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2))

    def _fit(self, x, qw):
        xr = self._sub_rows(x)
        if qw is None:
            scales, codes = rows_symmetric_rmse(xr, 4)
            scales = self._per_sub(scales, x)
            max_scale = self._pick_block_scale(scales)
            with np.errstate(divide="ignore", invalid="ignore"):
                iscale = F32(-32) / max_scale
                sc = np.clip(as_int8(nearest_int(iscale[:, None] * scales)).astype(np.int32), -32, 31) + 32
                d = np.where(max_scale != 0, F32(1) / iscale, F32(0))
            sc = np.where(max_scale[:, None] != 0, sc, 0)
        else:
            sigma2 = F32(2) * _block_sum_x2(x) / F32(QK_K)
            weights = self._sub_rows(_imatrix_weights(x, qw, sigma2))
            sw = self._per_sub(rows_sum(weights), x)
            scales, codes = rows_symmetric(xr, 4, weights)
            d, sc = rows_symmetric(self._per_sub(scales, x), 32, sw)
        return {"d": to_fp16(d), "scales": unpack_q3_scales(pack_q3_scales(as_uint8(sc))),
                "search_codes": self._block_codes(codes, x)}

    def _encode(self, p, codes):
        return {"hmask": pack_bits((codes >> 2).reshape(-1, 8, 32), 1, axis=1),
                "qs": pack_bits(codes.reshape(-1, 2, 4, 32), 2, axis=2).reshape(-1, 64),
                "scales": pack_q3_scales(p["scales"]), "d": fp16_bytes(p["d"])}

    def _decode(self, f):
        low = unpack_bits(f["qs"].reshape(-1, 2, 32), 2, 4, axis=2).reshape(-1, QK_K)
        high = unpack_bits(f["hmask"], 1, 8, axis=1).reshape(-1, QK_K)
        return {"d": fp16_from_bytes(f["d"]), "scales": unpack_q3_scales(f["scales"])}, low | (high << 2)


class Q6_K(_SymmetricK):
    name, ggml_type = "Q6_K", gguf.GGMLQuantizationType.Q6_K
    qmax, zero = 63, 32
    layout = (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2))

    def _fit(self, x, qw):
        scales, codes = rows_symmetric(self._sub_rows(x), 32, None if qw is None else self._sub_rows(qw))
        scales = self._per_sub(scales, x)
        max_scale = self._pick_block_scale(scales)
        empty = np.abs(max_scale) < GROUP_MAX_EPS  # ggml zeroes the whole block
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-128) / max_scale
            d = np.where(empty, F32(0), F32(1) / iscale)
            sc = as_int8(np.minimum(127, nearest_int(iscale[:, None] * scales)))
        sc = np.where(empty[:, None], np.int8(0), sc)
        codes = self._block_codes(codes, x)
        codes[empty] = 0
        return {"d": to_fp16(d), "scales": sc, "search_codes": codes}

    def _encode(self, p, codes):
        return {"ql": pack_bits((codes & np.uint8(0xF)).reshape(-1, 2, 2, 2, 32), 4, axis=2).reshape(-1, 128),
                "qh": pack_bits((codes >> 4).reshape(-1, 2, 4, 32), 2, axis=2).reshape(-1, 64),
                "scales": np.asarray(p["scales"]).astype(np.int8).view(np.uint8), "d": fp16_bytes(p["d"])}

    def _decode(self, f):
        low = unpack_bits(f["ql"].reshape(-1, 2, 2, 32), 4, 2, axis=2).reshape(-1, QK_K)
        high = unpack_bits(f["qh"].reshape(-1, 2, 32), 2, 4, axis=2).reshape(-1, QK_K)
        scales = np.ascontiguousarray(f["scales"]).view(np.int8)
        return {"d": fp16_from_bytes(f["d"]), "scales": scales}, low | (high << 4)


# ---------------------------------------------------------------- i-quants: IQ4_NL, IQ4_XS

# kvalues_iq4nl (ggml-common.h): the 16 non-linear levels shared by IQ4_NL and IQ4_XS, ascending.
IQ4NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32)


def best_index(levels: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8: the index of the level nearest to float32 v, ties to the upper level.

    Below the first level -> 0, above the last -> n-1; otherwise, with lo < v < hi the two levels around v,
    lo's index when (v - lo) < (hi - v) in float32, else hi's. Works on any shape (integer result)."""
    v = np.asarray(v, dtype=F32)
    nat = _native()
    if nat and levels.size <= 16:
        return nat.best_index(v, levels)
    n = levels.size
    hi = np.clip(np.searchsorted(levels, v, side="right"), 1, n - 1)  # first level > v
    with np.errstate(invalid="ignore"):
        idx = np.where((v - levels[hi - 1]) < (levels[hi] - v), hi - 1, hi)
        idx = np.where(v <= levels[0], 0, idx)
        return np.where(v >= levels[-1], n - 1, idx)


def search_iq4(x: np.ndarray, weights: np.ndarray, levels: np.ndarray = IQ4NL_LEVELS, ntry: int = 7) -> np.ndarray:
    """The scale search of quantize_row_iq4_nl_impl for one 32-element group per lane: scale [N].

    x, weights: [n, N]. A first scale maps the signed largest element onto -levels[0] (127); then
    2*ntry+1 trials map it onto levels[0] + itry, and the least-squares scale of the trial with the best
    sumqx^2 / sumq2 wins. Groups whose largest |x| is below GROUP_MAX_EPS get scale 0.
    """
    mx = signed_absmax(x)

    def trial(inv):
        q = levels[best_index(levels, inv * x)]
        wq = weights * q
        return seq_sum(wq * x), seq_sum(wq * q)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d0 = (-mx) / levels[0]  # ggml: -max / values[0]
        sumqx, sumq2 = trial(F32(1) / d0)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            sumqx, sumq2 = trial(F32(itry + int(levels[0])) / mx)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
            best = np.where(better, d * sumqx, best)
    return np.where(np.abs(mx) < GROUP_MAX_EPS, F32(0), d).astype(F32)


def rows_iq4(x: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """search_iq4 over rows of lanes [N, 32] (weights None: x^2), compiled when available."""
    nat = _native()
    if nat:
        return nat.search_nonlinear(x, weights, IQ4NL_LEVELS, 7)
    return search_iq4(_cols(x), _cols(x * x if weights is None else weights))


def _inverse(v: np.ndarray) -> np.ndarray:
    """ggml's ``v ? 1/v : 0`` in float32."""
    with np.errstate(divide="ignore"):
        return np.where(v != 0, F32(1) / v, F32(0)).astype(F32)


class _IQ4(BlockType):
    """IQ4_NL / IQ4_XS: 4-bit codes onto kvalues_iq4nl, 32-element sub-blocks, one search per sub-block.

    llama_model_quantize runs quantize_iq4_nl / quantize_iq4_xs with or without an imatrix (never the
    _ref path): weights are x^2 without one, imatrix[j] * sqrt(sigma2 + x^2) with one, sigma2 = 2/Nsb
    times the sum of x^2 over the (super-)block. The final codes come from the unrounded float32 scale
    (IQ4_NL) or the unrounded d times the integer sub-block scale (IQ4_XS), not from the stored fp16:
    they are the search codes, as for the legacy types. Code 8 (value 1) is what a zero scale gives.
    """

    sub = 32
    qmin, qmax, zero = 0, 15, 8
    levels = IQ4NL_LEVELS

    def _sub_scales(self, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        """The searched float32 scale of every 32-element sub-block, [rows * nb, block // 32]."""
        weights = None
        if qw is not None:
            flat = x.reshape(-1, self.block)
            sigma2 = rows_sum(flat * flat).reshape(*x.shape[:2], 1) * F32(2.0 / self.block)
            with np.errstate(invalid="ignore", over="ignore"):
                weights = _imatrix_weights(x, qw, sigma2).reshape(-1, 32)
        return rows_iq4(x.reshape(-1, 32), weights).reshape(-1, self.block // 32)

    def _nearest_levels(self, xs, scale):
        with np.errstate(invalid="ignore"):
            return best_index(self.levels, _inverse(scale) * xs)


class IQ4_NL(_IQ4):
    """32-element blocks: fp16 d, codes packed like Q4_0 (element j low nibble, j + 16 high)."""

    name, ggml_type = "IQ4_NL", gguf.GGMLQuantizationType.IQ4_NL
    block = 32
    layout = (("d", 2), ("qs", 16))

    def _fit(self, x, qw):
        scale = self._sub_scales(x, qw)  # [B, 1]
        with np.errstate(invalid="ignore"):
            codes = best_index(self.levels, _inverse(scale) * x.reshape(-1, 32))
        return {"d": to_fp16(scale[:, 0]), "search_codes": codes.astype(np.uint8)}

    def _effective(self, p):
        d = np.asarray(p["d"]).astype(F32)
        return d, _neg_zero(d)

    @property
    def header_model(self):
        from lowbit.quant.header_refit import HeaderModel

        return HeaderModel("d")

    def _encode(self, p, codes):
        return {"d": fp16_bytes(p["d"]), "qs": pack_bits(codes.reshape(-1, 2, 16), 4, axis=1)}

    def _decode(self, f):
        return {"d": fp16_from_bytes(f["d"])}, unpack_bits(f["qs"], 4, 2, axis=1).reshape(-1, 32)


class IQ4_XS(_IQ4):
    """256-element super-blocks: fp16 d and eight 6-bit sub-block scales (stored l + 32, low nibbles in
    scales_l, high 2-bit pairs in the uint16 scales_h); dequant d * (l - 32) * kvalues[code]."""

    name, ggml_type = "IQ4_XS", gguf.GGMLQuantizationType.IQ4_XS
    block = QK_K
    layout = (("d", 2), ("scales_h", 2), ("scales_l", 4), ("qs", 128))

    def _fit(self, x, qw):
        scales = self._sub_scales(x, qw)  # [B, 8]
        d = -signed_absmax(scales.T) / F32(32)
        ls = np.clip(nearest_int(_inverse(d)[:, None] * scales), -32, 31)
        dl = d[:, None] * ls.astype(F32)
        with np.errstate(invalid="ignore"):
            codes = best_index(self.levels, _inverse(dl)[..., None] * x.reshape(-1, 8, 32))
        return {"d": to_fp16(d), "scales": (ls + 32).astype(np.uint8),
                "search_codes": codes.reshape(-1, QK_K).astype(np.uint8)}

    def _effective(self, p):
        d = np.asarray(p["d"]).astype(F32)[..., None]
        scale = d * (np.asarray(p["scales"]).astype(np.int32) - 32).astype(F32)
        return scale, _neg_zero(scale)

    @property
    def header_model(self):
        """fp16 d times a 6-bit signed sub-block scale, stored + 32 (header_refit)."""
        from lowbit.quant.header_refit import header_model_of

        return header_model_of(self, np.arange(64, dtype=np.uint8))

    def _encode(self, p, codes):
        ls = np.asarray(p["scales"]).astype(np.uint8)
        return {"d": fp16_bytes(p["d"]),
                "scales_h": pack_bits((ls >> 4).reshape(-1, 2, 4), 2, axis=2),
                "scales_l": pack_bits(ls.reshape(-1, 4, 2), 4, axis=2),
                "qs": pack_bits(codes.reshape(-1, 8, 2, 16), 4, axis=2).reshape(-1, 128)}

    def _decode(self, f):
        high = unpack_bits(f["scales_h"], 2, 4, axis=2).reshape(-1, 8)
        low = unpack_bits(f["scales_l"], 4, 2, axis=2).reshape(-1, 8)
        codes = unpack_bits(f["qs"].reshape(-1, 8, 16), 4, 2, axis=2).reshape(-1, QK_K)
        return {"d": fp16_from_bytes(f["d"]), "scales": (low | (high << 4)).astype(np.uint8)}, codes


# ---------------------------------------------------------------- grid i-quants: IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S


def grid_tables(kgrid: np.ndarray, group: int, bits: int, top: int, nwant: int):
    """ggml's search tables for a grid (iq2xs_init_impl / iq3xs_init_impl), as numpy arrays.

    Point k of the grid has level i = (kgrid[k] >> bits*i) & (2**bits - 1); the search rounds a group of
    `group` weights to levels 0..top and packs them into u the same way. Returns (levels [G, group], kmap
    [2**(bits*group)] int32, lists uint16, start, count): kmap holds the grid index of a u on the grid and
    -(offset + 1) for one off it, `lists[offset]` being the number of its neighbours and the next entries
    their indices, as ggml keeps them for the compiled search; start / count locate the same indices for
    numpy. A u's neighbours are the points at its `nwant` smallest distinct squared distances (in units of
    2L+1), ordered by (distance, index) like ggml's qsort leaves them."""
    kgrid = np.asarray(kgrid).astype(np.int64)
    shifts = bits * np.arange(group)
    levels = (kgrid[:, None] >> shifts) & ((1 << bits) - 1)
    kmap = np.full(1 << (bits * group), -1, np.int64)
    kmap[kgrid] = np.arange(len(kgrid))
    span = top + 1
    u = (np.arange(span ** group)[:, None] // span ** np.arange(group)) % span      # every u the search forms
    code = (u << shifts).sum(-1)
    off = kmap[code] < 0
    u, code = u[off], code[off]
    d2 = 4 * ((u * u).sum(1)[:, None] + (levels * levels).sum(1)[None] - 2 * u @ levels.T)  # [U, G], exact ints
    limit = d2.min(1, keepdims=True)
    for _ in range(nwant - 1):                                                       # the next distinct distance
        limit = np.where(d2 > limit, d2, d2.max() + 1).min(1, keepdims=True)
    row, col = np.nonzero(d2 <= limit)
    pick = np.lexsort((col, d2[row, col], row))                                      # per u: by distance, index
    row, col = row[pick], col[pick]
    count = np.bincount(row, minlength=len(code))
    offset = np.cumsum(count + 1) - (count + 1)
    lists = np.empty(int(count.sum() + len(code)), np.uint16)
    lists[offset] = count
    lists[np.repeat(offset + 1, count) + np.arange(len(col)) - np.repeat(np.cumsum(count) - count, count)] = col
    kmap[code] = -(offset + 1)
    start = np.zeros(len(kmap), np.int64)
    start[code] = offset + 1
    counts = np.zeros(len(kmap), np.int64)
    counts[code] = count
    return levels, kmap.astype(np.int32), lists, start, counts


def sign_bits(stored: np.ndarray, folded: bool) -> np.ndarray:
    """Stored sign bits [..., k] (one byte per group of 8 weights) -> the signs of the 8k weights [..., 8k], True
    for negative. folded: 7 stored bits, the 8th evens the count of negatives (ksigns_iq2xs)."""
    stored = np.asarray(stored).astype(np.int64)
    if folded:
        parity = np.zeros_like(stored)
        for i in range(7):
            parity ^= (stored >> i) & 1
        stored = (stored & 127) | (parity << 7)
    return (((stored[..., None] >> np.arange(8)) & 1) == 1).reshape(*stored.shape[:-1], -1)


class _GridIQ(BlockType):
    """llama.cpp's grid i-quants: 256-element super-blocks with an fp16 d and a 4-bit scale ls per sub-block of
    `sub` weights; each group of `group` weights is one point of the type's grid (magnitudes 2L+1, L in 0..top),
    with one sign per weight. A weight dequantizes to scale(d, ls) * byte[L] * sign.

    Codes: L + n_levels for a negative weight, L for a positive one; `levels` holds +-byte. Only codes whose
    groups lie on the grid pack (and, where signs are folded, with an even count of negatives per 8).

    The search, shared by quantize_row_{iq3_xxs,iq3_s,iq2_xxs,iq2_xs,iq2_s}_impl with the settings below:
    weights qw * sqrt(sigma2 + x^2) with an importance (sigma2 = sigma_scale * mean x^2 over the super-block),
    a type's own without; |x| per weight, with folded signs the least important weight of a group of 8 with
    an odd count of negatives flipped; trial scales base / (center + step * is), every group rounded and, off
    the grid, moved to the weighted-nearest of its precomputed neighbours; a last pass at the best scale (see
    `redo`); then the sub-block scales quantized against d = max / 31 (stored d * d_fudge). The compiled port
    (lb_search_grid in ggml_search.c) runs the trials when available, about as fast as llama.cpp's own; the
    numpy reference otherwise (the same bytes, several times slower). Scalar column-wise rounding cannot
    target these types (a group must stay on the grid; `search_only`): GPTQ sweeps them a grid group at a
    time instead (lowbit.quant.gptq_blocks.quantize_lattice_gptq, headers from this search, grid points and
    signs chosen per group); AutoRound gives their tensors this search.
    """

    block = QK_K
    zero = 0
    search_only = True
    kgrid_name = bytes_name = ""
    group, bits, top, nwant = 8, 2, 2, 2    # grid: weights per point, bits per level in u, top level, neighbours
    center, step, ntrial = 5.0, 0.1, 9      # trial scales base / (center + step * is), is = -ntrial..ntrial
    start_on_grid = True                    # a lane no trial improves counts as on the grid (not so in IQ3_S)
    redo = 0                                # last pass: 0 the groups off the grid, 1 all if one is, 2 all
    fold_signs = True                       # 7 stored sign bits per 8 weights
    max_eps = GROUP_MAX_EPS                 # a sub-block whose largest |x| is below this (or 0) is left zero
    sigma_scale = 2.0
    d_fudge = 1.0
    unit = 0.25                             # scale = d * (0.5 + ls) * unit (IQ3_S: d * (1 + 2 ls))
    clear_zero_blocks = True                # ggml zeroes a block whose scales are all 0 (IQ3_S / IQ2_S leave it)

    def __init__(self):
        from lowbit.quant import ggml_iq_grids

        b = getattr(ggml_iq_grids, self.bytes_name).astype(F32)
        self.levels = np.concatenate([b, -b]).astype(F32)
        self.qmin, self.qmax = 0, 2 * b.size - 1
        self._tables = None

    @property
    def tables(self):
        """grid_tables of this type's grid, built on first use (tenths of a second)."""
        if self._tables is None:
            from lowbit.quant import ggml_iq_grids

            self._tables = grid_tables(getattr(ggml_iq_grids, self.kgrid_name), self.group, self.bits, self.top,
                                       self.nwant)
            self.points = np.ascontiguousarray(2 * self._tables[0] + 1, dtype=F32)
        return self._tables

    # -- the search

    def _plain_weights(self, xb: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
        """The weights without an importance: x^2 (IQ2_S adds sigma2 / 4; the IQ2_XXS / IQ2_XS ones refuse)."""
        return xb * xb

    def _start(self, xval: np.ndarray, weight: np.ndarray, mx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(base, start scale) per lane: trials try base / (center + step * is); base <= 0 leaves a lane zero."""
        return mx.astype(F32), (mx / F32(2 * self.top + 1)).astype(F32)

    def _best_neighbour(self, u, xval, waux, scale):
        """The find_best_neighbour of groups [P]: the grid index of each one's weighted-nearest neighbour. Every
        (group, neighbour) pair is scored at once; within a group the first of the smallest scores wins, as
        ggml's strict `d2 < best_d2` keeps the first."""
        _, _, lists, start, counts = self.tables
        count = counts[u]
        first = np.cumsum(count) - count
        owner = np.repeat(np.arange(len(u)), count)
        cand = lists[np.repeat(start[u] - first, count) + np.arange(int(count.sum()))].astype(np.int64)
        q = self.points[cand]                                           # [P', group] float32 2L+1
        d2 = np.zeros(len(cand), F32)
        sc, xs, ws = scale[owner], xval[owner], waux[owner]
        for i in range(self.group):
            diff = sc * q[:, i] - xs[:, i]
            d2 += ws[:, i] * diff * diff
        mins = np.minimum.reduceat(d2, first)
        pos = np.where(d2 == mins[owner], np.arange(len(cand)), len(cand))
        return cand[np.minimum.reduceat(pos, first)]

    def _snap(self, inv, xval, waux, scale, want):
        """Every group of lanes [S, n] rounded at 1/inv: (grid index [S, g] where `want`, -1 elsewhere; whether
        the rounded point was on the grid [S, g])."""
        kmap = self.tables[1]
        S = xval.shape[0]
        L = np.clip(nearest_int(F32(0.5) * (inv[:, None] * xval - F32(1))), 0, self.top).astype(np.int64)
        u = (L.reshape(S, -1, self.group) << (self.bits * np.arange(self.group))).sum(-1)
        index = kmap[u].astype(np.int64)
        on = index >= 0
        off = want & ~on
        if off.any():
            at = np.nonzero(off)
            index[at] = self._best_neighbour(u[at], xval.reshape(S, -1, self.group)[at],
                                             waux.reshape(S, -1, self.group)[at], scale[at[0]])
        return np.where(want, index, -1), on

    def _sums(self, weight, xval, index):
        q = self.points[index].reshape(weight.shape)
        return rows_sum(weight * xval * q), rows_sum(weight * q * q)

    def _search_numpy(self, xval, weight, base, scale):
        """The trials and the last pass over lanes [S, sub] (base > 0): (scale [S], grid index [S, g])."""
        S, n = xval.shape
        everywhere = np.ones((S, n // self.group), bool)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            waux = np.sqrt(weight)
            best = np.zeros(S, F32)
            index = np.zeros(everywhere.shape, np.int64)
            on_grid = everywhere if self.start_on_grid else ~everywhere
            for step in range(-self.ntrial, self.ntrial + 1):
                inv = (F32(self.center) + F32(step) * F32(self.step)) / base
                aux, on = self._snap(inv, xval, waux, F32(1) / inv, everywhere)
                sumqx, sumq2 = self._sums(weight, xval, aux)
                better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
                scale = np.where(better, sumqx / sumq2, scale)
                best = np.where(better, scale * sumqx, best)
                index = np.where(better[:, None], aux, index)
                on_grid = np.where(better[:, None], on, on_grid)
            redo = ((~on_grid).any(1) | (self.redo == 2)) & (scale > 0)
            if redo.any():
                want = (everywhere if self.redo else ~on_grid) & redo[:, None]
                fresh, _ = self._snap(F32(1) / scale, xval, waux, scale, want)
                index = np.where(want, fresh, index)
                sumqx, sumq2 = self._sums(weight, xval, index)
                scale = np.where(redo & (sumq2 > 0), sumqx / sumq2, scale)
        return scale.astype(F32), index

    def _search(self, xval, weight, base, start):
        nat = _native()
        if nat:
            scale, index = nat.search_grid(xval, weight, base, start, self)
            return scale, index.astype(np.int64)
        return self._search_numpy(xval, weight, base, start)

    def _fold(self, xb, weight):
        """(|x| with folded signs, negative mask [S, sub]): ggml flips the least important weight (smallest
        w x^2, the first on ties) of a group of 8 with an odd count of negatives when signs are folded."""
        neg = ~(xb >= 0)
        xval = np.where(neg, -xb, xb)
        if not self.fold_signs:
            return xval, neg
        S = xb.shape[0]
        odd = (neg.reshape(S, -1, 8).sum(-1) % 2) == 1
        imin = np.argmin((weight * xb * xb).reshape(S, -1, 8), axis=-1)
        flip = (odd[..., None] & (np.arange(8) == imin[..., None])).reshape(S, -1)
        return np.where(flip, -xval, xval), neg ^ flip

    def _fit(self, x, qw):
        if qw is None and self.needs_importance:
            raise LowbitError(f"{self.name} needs an importance matrix, as in llama.cpp: pass --imatrix FILE "
                              "(lowbit imatrix writes one)")
        self.tables
        flat = x.reshape(-1, QK_K)
        xb = flat.reshape(-1, self.sub)                                 # sub-blocks [S, sub]
        per = QK_K // self.sub
        sigma2 = (F32(self.sigma_scale) * rows_sum(flat * flat) / F32(QK_K)).repeat(per)[:, None]
        with np.errstate(invalid="ignore", over="ignore"):
            weight = (self._plain_weights(xb, sigma2) if qw is None
                      else qw.reshape(-1, self.sub) * np.sqrt(sigma2 + xb * xb)).astype(F32)
        xval, neg = self._fold(xb, weight)
        mx = xval.max(axis=1)
        base, scale = self._start(xval, weight, mx)
        live = (mx >= F32(self.max_eps)) & (mx != 0) & (base > 0)
        scale = np.where(live, scale, F32(0)).astype(F32)
        index = np.zeros((xb.shape[0], self.sub // self.group), np.int64)
        if live.any():
            at = np.nonzero(live)[0]
            scale[at], index[at] = self._search(xval[at], weight[at], base[at], scale[at])
        negative = scale < 0
        scale = np.where(negative, -scale, scale)
        neg = np.where(negative[:, None], ~neg, neg) & live[:, None]
        d, ls = self._block_scales(scale.reshape(-1, per))
        index, neg = self._arrange(index, neg, live)
        L = self.tables[0][index].reshape(xb.shape)
        codes = (L + (self.qmax + 1) // 2 * neg).reshape(-1, QK_K)
        if self.clear_zero_blocks:  # a block whose scales are all 0 gets zero grid bytes and signs
            codes[~(scale.reshape(-1, per).max(axis=1) > 0)] = 0
        return {"d": to_fp16(d), "scales": ls.astype(np.uint8), "search_codes": codes.astype(np.uint8)}

    def _block_scales(self, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sub-block scales [B, per] -> (d float32 [B] as stored, with the fudge; 4-bit ls [B, per])."""
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            d = (max_scale / F32(31)).astype(F32)
            inv = F32(1) / d
            ls = np.clip(nearest_int(F32(0.5) * (inv[:, None] * scales - F32(1))), 0, 15)
        zero = max_scale == 0
        ls[zero] = 0
        return np.where(zero, F32(0), d * F32(self.d_fudge)).astype(F32), ls

    def _arrange(self, index, neg, live):
        """Where ggml's writes put each sub-block's grid indices and signs (as searched, except in IQ3_S)."""
        return index, neg

    @property
    def header_model(self):
        """fp16 d per super-block times a 4-bit sub-block scale: what lowbit.quant.header_refit refits."""
        from lowbit.quant.header_refit import header_model_of

        return header_model_of(self, np.arange(16, dtype=np.uint8))

    def codes(self, w, params):
        search = params.get("search_codes")
        if search is None:
            raise LowbitError(f"{self.name}: codes come only from its own search (a group of {self.group} must "
                              "lie on the grid)")
        return np.asarray(search, dtype=np.uint8).reshape(np.shape(w)[0], -1)

    def _effective(self, p):
        d = np.asarray(p["d"]).astype(F32)[..., None]
        scale = d * (F32(0.5) + np.asarray(p["scales"]).astype(F32)) * F32(self.unit)
        return scale, _neg_zero(scale)

    # -- packing

    def _grid_and_signs(self, codes):
        """codes [B, 256] -> (grid index [B, 256 / group], stored sign bits [B, 32], 7 or 8 per group of 8)."""
        kmap = self.tables[1]
        half = (self.qmax + 1) // 2
        L = (codes % half).astype(np.int64).reshape(-1, QK_K // self.group, self.group)
        neg = (codes >= half).astype(np.int64).reshape(-1, 32, 8)
        grid = kmap[(L << (self.bits * np.arange(self.group))).sum(-1)]
        if (grid < 0).any() or (self.fold_signs and (neg.sum(-1) % 2).any()):
            raise LowbitError(f"{self.name}: codes off the grid" + (
                " or with an odd count of negatives in a group of 8" if self.fold_signs else ""))
        nbits = 7 if self.fold_signs else 8
        return grid.astype(np.int64), (neg[..., :nbits] << np.arange(nbits)).sum(-1)

    def _codes_from(self, grid, signs):
        """Inverse of _grid_and_signs: (grid index [B, 256 / group], stored sign bits [B, 32]) -> codes [B, 256]."""
        L = self.tables[0][np.asarray(grid).astype(np.int64)].reshape(-1, QK_K)
        neg = sign_bits(signs, self.fold_signs)
        return (L + (self.qmax + 1) // 2 * neg).astype(np.uint8)


class IQ3_XXS(_GridIQ):
    """3.06 bpw: sub-blocks of 32, groups of 4 on a 256-point grid (levels 0..7, bytes IQ3XXS_BYTES); per
    sub-block one uint32: four 7-bit sign groups (bits 7k) and the 4-bit scale (bits 28..31), after the 64 grid
    bytes. Dequant d * (0.5 + ls) * 0.5 * byte. Trials from max / 15; d stored * 1.0125. Without an importance
    the weights are x^2 (llama_model_quantize still requires an imatrix for IQ3_XXS tensors: gguf_mix)."""

    name, ggml_type = "IQ3_XXS", gguf.GGMLQuantizationType.IQ3_XXS
    sub = 32
    layout = (("d", 2), ("qs", 64), ("signs", 32))
    kgrid_name, bytes_name = "IQ3XXS_KGRID", "IQ3XXS_BYTES"
    group, bits, top, nwant = 4, 3, 7, 2
    center, step, ntrial = 15.0, 0.2, 15
    max_eps, d_fudge, unit = 1e-8, 1.0125, 0.5

    def _encode(self, p, codes):
        grid, seven = self._grid_and_signs(codes)                      # [B, 64], [B, 32]
        word = (seven.reshape(-1, 8, 4) << (7 * np.arange(4))).sum(-1) | (
            np.asarray(p["scales"]).astype(np.int64).reshape(-1, 8) << 28)
        return {"d": fp16_bytes(p["d"]), "qs": grid.astype(np.uint8),
                "signs": np.ascontiguousarray(word.astype("<u4")).view(np.uint8).reshape(-1, 32)}

    def _decode(self, f):
        word = np.ascontiguousarray(f["signs"]).view("<u4").reshape(-1, 8, 1).astype(np.int64)
        codes = self._codes_from(f["qs"], ((word >> (7 * np.arange(4))) & 127).reshape(-1, 32))
        return {"d": fp16_from_bytes(f["d"]), "scales": (word[..., 0] >> 28).astype(np.uint8)}, codes


class IQ3_S(_GridIQ):
    """3.44 bpw: sub-blocks of 32, groups of 4 on a 512-point grid (bytes 2L + 1): the grid index's low byte in
    qs, its 9th bit in qh (bit k of byte ib for group k of sub-block ib), 8 sign bits per 8 weights, 4-bit
    scales two to a byte. Dequant d * (1 + 2 ls) * byte. Trials from max / 15 (none improving leaves every
    group to redo); only an all-zero sub-block is left zero; d stored * 1.033."""

    name, ggml_type = "IQ3_S", gguf.GGMLQuantizationType.IQ3_S
    sub = 32
    layout = (("d", 2), ("qs", 64), ("qh", 8), ("signs", 32), ("scales", 4))
    kgrid_name, bytes_name = "IQ3S_KGRID", "IQ3S_BYTES"
    group, bits, top, nwant = 4, 3, 7, 3
    center, step, ntrial = 15.0, 0.2, 9
    start_on_grid, redo, fold_signs, clear_zero_blocks = False, 1, False, False
    max_eps, d_fudge = 0.0, 1.033

    def _arrange(self, index, neg, live):
        """ggml advances its qs / signs write pointers only past sub-blocks it quantized, so each all-zero
        sub-block shifts the later sub-blocks' grid bytes and signs one slot down (the trailing slots stay
        zero); the 9th grid bits (qh) and the scales stay at their own sub-block. This reproduces the bytes."""
        B = live.size // 8
        alive = live.reshape(B, 8)
        order = np.argsort(~alive, axis=1, kind="stable")[..., None]
        kept = np.take_along_axis(alive, order[..., 0], axis=1)[..., None]
        low = np.take_along_axis((index & 255).reshape(B, 8, -1), order, axis=1) * kept
        signs = np.take_along_axis(neg.reshape(B, 8, -1), order, axis=1) & kept
        return (low | (index.reshape(B, 8, -1) & 256)).reshape(index.shape), signs.reshape(neg.shape)

    def _effective(self, p):
        d = np.asarray(p["d"]).astype(F32)[..., None]
        scale = d * (1 + 2 * np.asarray(p["scales"]).astype(np.int32)).astype(F32)
        return scale, _neg_zero(scale)

    def _encode(self, p, codes):
        grid, signs = self._grid_and_signs(codes)                      # [B, 64], [B, 32]
        return {"d": fp16_bytes(p["d"]), "qs": (grid & 255).astype(np.uint8),
                "qh": pack_bits((grid >> 8).reshape(-1, 8, 8), 1, axis=2),
                "signs": signs.astype(np.uint8),
                "scales": pack_bits(np.asarray(p["scales"]).reshape(-1, 4, 2), 4, axis=2)}

    def _decode(self, f):
        high = unpack_bits(f["qh"], 1, 8, axis=2).reshape(-1, 64).astype(np.int64)
        codes = self._codes_from(f["qs"].astype(np.int64) | (high << 8), f["signs"])
        return {"d": fp16_from_bytes(f["d"]), "scales": unpack_bits(f["scales"], 4, 2, axis=2).reshape(-1, 8)}, codes


class _IQ2(_GridIQ):
    """IQ2_XXS and IQ2_XS: groups of 8 with folded signs on a 256 / 512-point grid (levels 0..2, bytes IQ2_BYTES),
    dequant d * (0.5 + ls) * 0.25 * byte; sigma2 is the plain mean x^2. llama.cpp refuses them without an
    importance (ggml_quantize_requires_imatrix); so does lowbit. GGUF file types IQ2_XXS / IQ2_XS
    (lowbit.quant.gguf_mix) and --tensor-type targets."""

    needs_importance = True
    bytes_name = "IQ2_BYTES"
    sigma_scale = 1.0


class IQ2_XXS(_IQ2):
    """2.06 bpw: per sub-block of 32, two uint32 words: four grid bytes (256-point grid), then four 7-bit sign
    groups (bits 7k) and the 4-bit scale (bits 28..31). Trials start from make_qp_quants' scale over 0..4, and
    the last pass redoes every group."""

    name, ggml_type = "IQ2_XXS", gguf.GGMLQuantizationType.IQ2_XXS
    sub = 32
    layout = (("d", 2), ("qs", 64))
    kgrid_name, ntrial, redo = "IQ2XXS_KGRID", 6, 2

    def _start(self, xval, weight, mx):
        scale, _ = rows_positive(xval, 4, weight)
        return (scale * F32(3)).astype(F32), scale.astype(F32)

    def _encode(self, p, codes):
        grid, seven = self._grid_and_signs(codes)                      # [B, 32] each, 4 groups per sub-block
        word0 = (grid.reshape(-1, 8, 4) << (8 * np.arange(4))).sum(-1)
        word1 = (seven.reshape(-1, 8, 4) << (7 * np.arange(4))).sum(-1) | (
            np.asarray(p["scales"]).astype(np.int64).reshape(-1, 8) << 28)
        words = np.stack([word0, word1], axis=-1).astype("<u4")        # [B, 8, 2]
        return {"d": fp16_bytes(p["d"]), "qs": np.ascontiguousarray(words).view(np.uint8).reshape(-1, 64)}

    def _decode(self, f):
        words = np.ascontiguousarray(f["qs"]).view("<u4").reshape(-1, 8, 2).astype(np.int64)
        grid = (words[..., 0:1] >> (8 * np.arange(4))) & 255           # [B, 8, 4]
        seven = (words[..., 1:2] >> (7 * np.arange(4))) & 127
        codes = self._codes_from(grid.reshape(-1, 32), seven.reshape(-1, 32))
        return {"d": fp16_from_bytes(f["d"]), "scales": (words[..., 1] >> 28).astype(np.uint8)}, codes


class IQ2_XS(_IQ2):
    """2.31 bpw: per group of 8 a uint16, grid index (512-point grid) | 7 sign bits << 9; per sub-block of 16
    a 4-bit scale, two to a byte (low nibble first) after the 32 uint16. Trials start from max / 5."""

    name, ggml_type = "IQ2_XS", gguf.GGMLQuantizationType.IQ2_XS
    sub = 16
    layout = (("d", 2), ("qs", 64), ("scales", 8))
    kgrid_name = "IQ2XS_KGRID"

    def _encode(self, p, codes):
        grid, seven = self._grid_and_signs(codes)
        words = (grid | (seven << 9)).astype("<u2")
        return {"d": fp16_bytes(p["d"]), "qs": np.ascontiguousarray(words).view(np.uint8).reshape(-1, 64),
                "scales": pack_bits(np.asarray(p["scales"]).reshape(-1, 8, 2), 4, axis=2)}

    def _decode(self, f):
        words = np.ascontiguousarray(f["qs"]).view("<u2").reshape(-1, 32).astype(np.int64)
        codes = self._codes_from(words & 511, words >> 9)
        return {"d": fp16_from_bytes(f["d"]), "scales": unpack_bits(f["scales"], 4, 2, axis=2).reshape(-1, 16)}, codes


class IQ2_S(_GridIQ):
    """2.56 bpw: sub-blocks of 16, groups of 8 on a 1024-point grid (levels 0..2, bytes IQ2_BYTES): the grid
    index's low byte in qs, one byte of 8 signs per group, the top 2 bits in qh (bits 2(k % 4) of byte k / 4),
    4-bit scales two to a byte. Dequant d * (0.5 + ls) * 0.25 * byte. Trials from max / 5 onto the nearest
    neighbours only; without an importance the weights are sigma2 / 4 + x^2; d stored * 0.9875."""

    name, ggml_type = "IQ2_S", gguf.GGMLQuantizationType.IQ2_S
    sub = 16
    layout = (("d", 2), ("qs", 32), ("signs", 32), ("qh", 8), ("scales", 8))
    kgrid_name, bytes_name, nwant = "IQ2S_KGRID", "IQ2_BYTES", 1
    fold_signs = clear_zero_blocks = False
    max_eps, d_fudge = 1e-8, 0.9875

    def _plain_weights(self, xb, sigma2):
        return F32(0.25) * sigma2 + xb * xb

    def _encode(self, p, codes):
        grid, signs = self._grid_and_signs(codes)                      # [B, 32] each
        return {"d": fp16_bytes(p["d"]), "qs": (grid & 255).astype(np.uint8), "signs": signs.astype(np.uint8),
                "qh": pack_bits((grid >> 8).reshape(-1, 8, 4), 2, axis=2),
                "scales": pack_bits(np.asarray(p["scales"]).reshape(-1, 8, 2), 4, axis=2)}

    def _decode(self, f):
        high = unpack_bits(f["qh"], 2, 4, axis=2).reshape(-1, 32).astype(np.int64)
        codes = self._codes_from(f["qs"].astype(np.int64) | (high << 8), f["signs"])
        return {"d": fp16_from_bytes(f["d"]), "scales": unpack_bits(f["scales"], 4, 2, axis=2).reshape(-1, 16)}, codes


TYPES: dict[str, BlockType] = {t.name: t for t in (Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(),
                                                   Q2_K(), Q3_K(), Q4_K(), Q5_K(), Q6_K(), IQ4_NL(), IQ4_XS(),
                                                   IQ2_XXS(), IQ2_XS(), IQ2_S(), IQ3_XXS(), IQ3_S())}


def block_type(name: str) -> BlockType:
    """The BlockType for a ggml type name such as "Q4_K" (case-insensitive)."""
    t = TYPES.get(str(name).upper())
    if t is None:
        raise LowbitError(f"unknown ggml block type {name!r}; valid: {', '.join(TYPES)}")
    return t
