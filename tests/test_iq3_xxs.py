"""IQ3_XXS (lowbit.quant.ggml_blocks.IQ3_XXS) against llama.cpp and gguf-py.

IQ3_XXS is in ggml_blocks.TYPES and a GGUF file type; llama.cpp's whole IQ3_XXS mix (with IQ3_S and IQ2_S,
test_iq3_s_iq2_s.py) is compared file for file in test_gguf_iq3_xxs_files.py. Here, block by block:

  * its grid (generated from ggml-quants.c's kgrid_256 and the level bytes) equals gguf-py's IQ3_XXS grid;
  * gguf-py's dequantization of lowbit's blocks equals lowbit's, and unpack/pack round-trips;
  * on real SmolLM2 down_proj rows, without an importance (ggml_quantize_chunk allows that; only
    llama_model_quantize insists on an imatrix) and with a seeded random one, every block equals llama.cpp's
    (ggml_quantize_chunk through ctypes); so do edge-case rows under corner-case importances;
  * the compiled search (ggml_search.c) and the numpy reference give the same bytes;
  * slow: llama_model_quantize's IQ3_XXS on a 1-layer synthetic Llama, every IQ3_XXS tensor.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from test_ggml_blocks import bits, imatrix_for, random_importance, sample_weights, synthetic_f32_gguf
from test_iq2 import ggml_quantize, identical
from test_iq3_s_iq2_s import zero_sub_block_rows

from lowbit.quant.ggml_blocks import IQ3_XXS, TYPES
from lowbit.quant.ggml_iq_grids import IQ3XXS_BYTES, IQ3XXS_KGRID


@pytest.fixture(scope="module")
def down_proj(model_dir) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        return f.get_tensor("model.layers.0.mlp.down_proj.weight").astype(np.float32)


def test_grid_equals_gguf_py() -> None:
    if gguf.quants.IQ3_XXS.grid is None:
        gguf.quants.IQ3_XXS.init_grid()
    levels = (IQ3XXS_KGRID[:, None].astype(int) >> (3 * np.arange(4))) & 7
    assert np.array_equal(IQ3XXS_BYTES[levels].ravel(), np.asarray(gguf.quants.IQ3_XXS.grid).ravel())
    t = TYPES["IQ3_XXS"]
    assert isinstance(t, IQ3_XXS) and (t.block, t.bytes_per_block) == gguf.GGML_QUANT_SIZES[t.ggml_type]


def test_dequantize_equals_gguf_py_and_round_trips() -> None:
    t = TYPES["IQ3_XXS"]
    rng = np.random.default_rng(1)
    w = sample_weights(rng, 24, 512)
    for imp in (None, random_importance(rng, 512)):
        raw = t.quantize(w, imp)
        assert np.array_equal(bits(t.dequantize(raw, 512)), bits(gguf.quants.dequantize(raw, t.ggml_type)))
        params, codes = t.unpack(raw, 512)
        assert np.array_equal(t.pack(params, codes), raw)


def test_compiled_search_equals_numpy_reference(monkeypatch) -> None:
    from lowbit.quant import native

    if not native.available():
        pytest.skip("no compiled search on this host")
    t = TYPES["IQ3_XXS"]
    rng = np.random.default_rng(3)
    w = np.concatenate([sample_weights(rng, 40, 512), zero_sub_block_rows(rng, 512)])
    imp = random_importance(rng, 512)
    fast = [t.quantize(w, None), t.quantize(w, imp)]
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert np.array_equal(t.quantize(w, None), fast[0])
    assert np.array_equal(t.quantize(w, imp), fast[1])


def test_real_blocks_equal_llamacpp(down_proj) -> None:
    """Real weights (layer 0 down_proj, 128 rows of 1536) without an importance and with a seeded random one."""
    t = TYPES["IQ3_XXS"]
    w = down_proj[:128]
    for label, imp in (("no importance", None), ("importance", random_importance(np.random.default_rng(4), 1536))):
        ours = t.quantize(w, imp)
        same, total = identical(t, ours, ggml_quantize(t, w, imp))
        print(f"IQ3_XXS {label}: {same}/{total} real blocks identical to llama.cpp")
        assert same == total, label


@pytest.mark.slow  # ~5-10 s: llama_model_quantize (its IQ2_S table setup alone is seconds); the default suite
# compares whole IQ3_XXS files in test_gguf_iq3_xxs_files.py
def test_blocks_equal_llama_model_quantize(tmp_path) -> None:
    pytest.importorskip("llama_cpp")
    from lowbit.peers.llamacpp import llamacpp_quantize

    src = tmp_path / "f32.gguf"
    f32, importance = synthetic_f32_gguf(src, np.random.default_rng(2), layers=1, ffn=256)
    out = llamacpp_quantize(src, tmp_path / "iq3_xxs.gguf", "IQ3_XXS", imatrix_for(importance))
    same = total = 0
    names = []
    for tensor in gguf.GGUFReader(str(out)).tensors:
        t = TYPES.get(tensor.tensor_type.name)
        if t is None or not tensor.name.startswith("blk."):
            continue
        names.append(f"{tensor.name}:{t.name}")
        a, b = identical(t, t.quantize(f32[tensor.name], importance[tensor.name]), np.asarray(tensor.data, np.uint8))
        same, total = same + a, total + b
    print(f"IQ3_XXS file: {same}/{total} blocks identical to llama.cpp over {names}")
    assert any(n.endswith(":IQ3_XXS") for n in names) and same == total
