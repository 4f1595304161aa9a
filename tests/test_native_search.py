"""The compiled block searches (lowbit.quant.native) against the numpy reference they port.

The numpy searches in ggml_blocks are themselves checked byte for byte against llama.cpp's quantizer
(test_ggml_blocks.py, which now runs the compiled path); here the two implementations must agree
exactly, field for field, on inputs built to reach every branch: all-zero, constant and one-signed
lanes, fp16 underflow, outliers, rounding ties, and lane counts that do not fill the kernel's vectors.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.quant import ggml_blocks as gb
from lowbit.quant import native
from test_ggml_blocks import edge_rows

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the compiled searches are not built")


def _pair(monkeypatch, fn):
    """fn() with the compiled searches, then with the numpy reference."""
    monkeypatch.setenv("LOWBIT_NATIVE", "1")
    fast = fn()
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    ref = fn()
    monkeypatch.setenv("LOWBIT_NATIVE", "1")
    return fast, ref


def _lanes(rng: np.random.Generator, count: int, n: int) -> np.ndarray:
    x = (rng.standard_t(2.5, size=(count, n)) * 0.02).astype(np.float32)
    x[0] = 0
    x[1] = 0.01
    x[2] = -0.01
    x[3] *= 1e-7
    x[4] = np.abs(x[4])
    x[5] = -np.abs(x[5])
    x[6] = rng.integers(-4, 5, size=n) * 0.25
    x[7, ::3] = 0
    x[8, 0] = -0.0
    x[8, 1:] = 0
    x[9] *= 300
    return x


@pytest.mark.parametrize("n", [8, 16, 32])
@pytest.mark.parametrize("count", [1, 7, 37, 130])
def test_primitives_equal_reference(monkeypatch, n, count):
    rng = np.random.default_rng(n * 1000 + count)
    x = _lanes(rng, max(count, 10), n)[:count]
    w = (np.abs(x) + rng.random(x.shape).astype(np.float32) * 0.01).astype(np.float32)
    pos = np.abs(x) * 40
    calls = {
        "symmetric": lambda: gb.rows_symmetric(x, 32 if n == 16 else 8, None),
        "symmetric weighted": lambda: gb.rows_symmetric(x, 4, w),
        "symmetric rmse": lambda: gb.rows_symmetric_rmse(x, 4),
        "affine mad": lambda: gb.rows_affine(x, w, 3, -0.5, 0.1, 15, True),
        "affine": lambda: gb.rows_affine(x, w, 15, -1.0, 0.1, 20, False),
        "affine qkx3": lambda: gb.rows_affine(x, w, 31, -0.9, 0.05, 36, False),
        "positive": lambda: gb.rows_positive(pos, 63, w),
        "row sum": lambda: (gb.rows_sum(x),),
        "row sum first": lambda: (gb.rows_sum(w, first=True),),
        "iq4": lambda: (gb.rows_iq4(x, None),),
        "iq4 weighted": lambda: (gb.rows_iq4(x, w),),
    }
    for name, call in calls.items():
        fast, ref = _pair(monkeypatch, call)
        for a, b in zip(fast, ref):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape, name
            same = a.view(np.uint32) == b.view(np.uint32) if a.dtype == np.float32 else a == b
            assert same.all(), f"{name}: {np.count_nonzero(~same)} of {a.size} values differ"


def test_best_index_equal_reference(monkeypatch):
    """ggml's best_index_int8 on IQ4's levels: every float32 within 50 ulps of each midpoint (the ties and
    their float32 rounding), the ends, infinities and NaN, and a spread of ordinary values."""
    levels = gb.IQ4NL_LEVELS
    mids = ((levels[:-1] + levels[1:]) / 2).astype(np.float32)
    near = (mids.view(np.int32)[:, None] + np.arange(-50, 51, dtype=np.int32)).view(np.float32).ravel()
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, *levels, *(levels * 2)], np.float32)
    spread = (np.random.default_rng(0).standard_t(2.5, size=10007) * 60).astype(np.float32)
    v = np.concatenate([near, special, spread])
    fast, ref = _pair(monkeypatch, lambda: gb.best_index(levels, v))
    assert np.array_equal(fast, ref)
    assert fast[-10007:].min() == 0 and fast[-10007:].max() == 15


@pytest.mark.parametrize("name", sorted(gb.TYPES))
@pytest.mark.parametrize("imatrix", [False, True])
def test_block_types_byte_identical(monkeypatch, name, imatrix):
    rng = np.random.default_rng(7)
    w = edge_rows(rng, 512)
    imp = (rng.random(512) ** 3).astype(np.float32) if imatrix else None
    bt = gb.block_type(name)
    if bt.needs_importance and imp is None:  # IQ2: both paths refuse in one line, as llama.cpp does
        for native_on in ("1", "0"):
            monkeypatch.setenv("LOWBIT_NATIVE", native_on)
            with pytest.raises(LowbitError, match="--imatrix"):
                bt.quantize(w, imp)
        return
    fast, ref = _pair(monkeypatch, lambda: bt.quantize(w, imp))
    assert fast.tobytes() == ref.tobytes()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert not native.available()
    monkeypatch.setenv("LOWBIT_NATIVE", "1")
    assert native.available()


def test_library_cached_per_host(tmp_path, monkeypatch):
    """A new cache builds the library once, under a name keyed by source, compiler and CPU."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    cc = native._compiler()
    path = native.library_path(cc)
    assert path.parent == tmp_path / "kernels" and not path.exists()
    native._build(cc, path)
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
