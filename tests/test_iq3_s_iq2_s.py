"""IQ3_S and IQ2_S (lowbit.quant.ggml_blocks) against llama.cpp and gguf-py.

llama.cpp's IQ3_XXS file type writes its untied token_embd and attn_output as IQ3_S (and attn_v without an
imatrix), attn_q / attn_k as IQ2_S; the whole files are in test_gguf_iq3_xxs_files.py. Here, block by block:

  * their grids (stored from ggml-quants.c's kgrid_512 / kgrid_2bit_1024, with the level bytes) equal gguf-py's
    IQ3_S / IQ2_S grids, and the block sizes gguf-py's;
  * on real SmolLM2 down_proj rows (1536 columns), without an importance and with a seeded random one, every
    block equals the one llama.cpp's own quantizer writes (ggml_quantize_chunk from llama-cpp-python's
    libggml-base through ctypes), and gguf-py's dequantization of those blocks equals lowbit's;
  * so do edge-case rows, among them rows with whole zero sub-blocks (IQ3_S then shifts the later sub-blocks'
    grid bytes and signs, as ggml's write pointers do), under corner-case importances;
  * the compiled search (ggml_search.c) and the numpy reference give the same bytes;
  * unpack/pack round-trips, and codes off the grid are refused in one line.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from test_ggml_blocks import bits, random_importance, sample_weights
from test_iq2 import ggml_quantize, identical

from lowbit.errors import LowbitError
from lowbit.quant.ggml_blocks import TYPES
from lowbit.quant.ggml_iq_grids import IQ2_BYTES, IQ2S_KGRID, IQ3S_BYTES, IQ3S_KGRID

NAMES = ("IQ3_S", "IQ2_S")
GRID = {"IQ3_S": (IQ3S_KGRID, IQ3S_BYTES, 3, 4), "IQ2_S": (IQ2S_KGRID, IQ2_BYTES, 2, 8)}


@pytest.fixture(scope="module")
def down_proj(model_dir) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        return f.get_tensor("model.layers.0.mlp.down_proj.weight").astype(np.float32)


def zero_sub_block_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows whose 256-blocks hold whole zero 32- and 16-element sub-blocks among non-zero ones (and a tiny one
    that is not zero): where IQ3_S's write pointers lag behind."""
    w = (rng.standard_t(2.5, size=(6, n)) * 0.02).astype(np.float32)
    w[0, 32:64] = 0
    w[1, 0:32] = 0
    w[1, 96:160] = 0
    w[2, 224:256] = 0
    w[3, 256 + 64:256 + 96] = 0
    w[4, 0:16] = 0
    w[4, 48:64] = 0
    w[5, 32:64] = 1e-30
    return w


@pytest.mark.parametrize("name", NAMES)
def test_grid_equals_gguf_py(name) -> None:
    ref = getattr(gguf.quants, name)
    if ref.grid is None:
        ref.init_grid()
    kgrid, level_bytes, nbits, group = GRID[name]
    levels = (kgrid[:, None].astype(int) >> (nbits * np.arange(group))) & ((1 << nbits) - 1)
    assert np.array_equal(level_bytes[levels], np.asarray(ref.grid).reshape(-1, group))
    t = TYPES[name]
    assert (t.block, t.bytes_per_block) == gguf.GGML_QUANT_SIZES[t.ggml_type]


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_equals_gguf_py_and_round_trips(name) -> None:
    t = TYPES[name]
    rng = np.random.default_rng(1)
    w = np.concatenate([sample_weights(rng, 24, 512), zero_sub_block_rows(rng, 512)])
    for imp in (None, random_importance(rng, 512)):
        raw = t.quantize(w, imp)
        assert np.array_equal(bits(t.dequantize(raw, 512)), bits(gguf.quants.dequantize(raw, t.ggml_type)))
        params, codes = t.unpack(raw, 512)
        assert np.array_equal(t.pack(params, codes), raw)
    kgrid, level_bytes, nbits, group = GRID[name]
    on_grid = set(kgrid.tolist())
    levels = lambda u: [(u >> (nbits * i)) & ((1 << nbits) - 1) for i in range(group)]  # noqa: E731
    off = next(u for u in range(1 << (nbits * group)) if u not in on_grid and max(levels(u)) < len(level_bytes))
    bad = codes.copy()
    bad[0, :group] = levels(off)  # positive weights on no grid point
    with pytest.raises(LowbitError, match="off the grid") as e:
        t.pack(params, bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_search_equals_numpy_reference(name, monkeypatch) -> None:
    from lowbit.quant import native

    if not native.available():
        pytest.skip("no compiled search on this host")
    t = TYPES[name]
    rng = np.random.default_rng(3)
    w = np.concatenate([sample_weights(rng, 40, 512), zero_sub_block_rows(rng, 512)])
    imp = random_importance(rng, 512)
    fast = [t.quantize(w, None), t.quantize(w, imp)]
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert np.array_equal(t.quantize(w, None), fast[0])
    assert np.array_equal(t.quantize(w, imp), fast[1])


@pytest.mark.parametrize("name", NAMES)
def test_real_blocks_equal_llamacpp(name, down_proj) -> None:
    """Real weights (layer 0 down_proj, 128 rows of 1536) without an importance and with a seeded random one."""
    t = TYPES[name]
    w = down_proj[:128]
    for label, imp in (("no importance", None), ("importance", random_importance(np.random.default_rng(4), 1536))):
        ours = t.quantize(w, imp)
        same, total = identical(t, ours, ggml_quantize(t, w, imp))
        print(f"{name} {label}: {same}/{total} real blocks identical to llama.cpp")
        assert same == total, label
        assert np.array_equal(bits(t.dequantize(ours, 1536)), bits(gguf.quants.dequantize(ours, t.ggml_type)))


@pytest.mark.parametrize("name", NAMES + ("IQ3_XXS",))
def test_corner_cases_equal_llamacpp(name) -> None:
    """IQ3_S, IQ2_S and IQ3_XXS: edge-case rows (zeros, constants, underflow, outliers, ties, zero sub-blocks) without an importance and
    under importances that reach the search's corners: all zero (no trial is ever better), one-hot, ones,
    mostly zero, huge (weights overflow), tiny."""
    t = TYPES[name]
    rng = np.random.default_rng(7)
    w = np.concatenate([sample_weights(rng, 16, 512), zero_sub_block_rows(rng, 512)])
    base = random_importance(rng, 512)
    imps = {"none": None, "zero": np.zeros(512), "one-hot": np.eye(512)[3], "ones": np.ones(512),
            "sparse": (rng.random(512) < 0.1) * 1.0, "huge": base * 1e30, "tiny": base * 1e-38}
    for label, imp in imps.items():
        imp = None if imp is None else imp.astype(np.float32)
        same, total = identical(t, t.quantize(w, imp), ggml_quantize(t, w, imp))
        assert same == total, f"{label}: {same}/{total}"
