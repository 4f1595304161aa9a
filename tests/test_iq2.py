"""IQ2_XXS and IQ2_XS (lowbit.quant.ggml_blocks) against llama.cpp and gguf-py.

Both are in ggml_blocks.TYPES and are GGUF file types; the whole files against llama_model_quantize are in
test_gguf_iq2_files.py.

  * their grids (stored from ggml-quants.c's kgrid_2bit_256 / kgrid_2bit_512, with the level bytes) equal
    gguf-py's IQ2_XXS / IQ2_XS grids;
  * without an importance they refuse, in one line naming --imatrix (llama.cpp refuses IQ2 without one);
  * on real SmolLM2 down_proj rows (1536 columns) with a seeded random importance, every block equals the one
    llama.cpp's own quantizer writes (ggml_quantize_chunk from llama-cpp-python's libggml-base, called through
    ctypes with the same importance), and gguf-py's dequantization of those blocks equals lowbit's;
  * so do edge-case rows under corner-case importances (all zero, one-hot, huge, tiny, ...);
  * the compiled search (ggml_search.c) and the numpy reference give the same bytes;
  * slow: more real tensors with the mean x^2 of real activations as the importance, edge-case rows, and
    llama_model_quantize's IQ2_XXS / IQ2_XS file types on a 1-layer synthetic Llama.
"""

from __future__ import annotations

import ctypes
import os
import time

import gguf
import numpy as np
import pytest
import torch

from test_ggml_blocks import bits, imatrix_for, random_importance, sample_weights, synthetic_f32_gguf

from lowbit.errors import LowbitError
from lowbit.quant.ggml_blocks import IQ2_XS, IQ2_XXS
from lowbit.quant.ggml_iq_grids import IQ2_BYTES, IQ2XS_KGRID, IQ2XXS_KGRID

TYPES = {"IQ2_XXS": IQ2_XXS(), "IQ2_XS": IQ2_XS()}
KGRID = {"IQ2_XXS": IQ2XXS_KGRID, "IQ2_XS": IQ2XS_KGRID}


# ---------------------------------------------------------------- llama.cpp's quantizer through ctypes


_GGML = None


def ggml_quantize(t, w: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """llama.cpp's bytes for w [rows, n] with the importance [n] (or none, where ggml allows it):
    ggml_quantize_chunk, the call llama_model_quantize makes per tensor."""
    global _GGML
    llama_cpp = pytest.importorskip("llama_cpp")
    if _GGML is None:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        _GGML = lib
    w = np.ascontiguousarray(w, np.float32)
    imp = None if importance is None else np.ascontiguousarray(importance, np.float32)
    assert imp is None or imp.shape == (w.shape[1],)
    rows, n = w.shape
    out = np.zeros((rows, n // t.block * t.bytes_per_block), np.uint8)
    size = _GGML.ggml_quantize_chunk(int(t.ggml_type), w.ctypes.data, out.ctypes.data, 0, rows, n,
                                     None if imp is None else imp.ctypes.data)
    assert size == out.size
    return out


def identical(t, ours: np.ndarray, theirs: np.ndarray) -> tuple[int, int]:
    same = (ours.reshape(-1, t.bytes_per_block) == theirs.reshape(-1, t.bytes_per_block)).all(1)
    return int(same.sum()), same.size


@pytest.fixture(scope="module")
def down_proj(model_dir) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        return f.get_tensor("model.layers.0.mlp.down_proj.weight").astype(np.float32)


# ---------------------------------------------------------------- format and API


@pytest.mark.parametrize("name", TYPES)
def test_grid_equals_gguf_py(name) -> None:
    ref = getattr(gguf.quants, name)
    if ref.grid is None:
        ref.init_grid()
    levels = (KGRID[name][:, None].astype(int) >> (2 * np.arange(8))) & 3
    assert np.array_equal(IQ2_BYTES[levels], np.asarray(ref.grid).reshape(-1, 8))
    t = TYPES[name]
    assert (t.block, t.bytes_per_block) == gguf.GGML_QUANT_SIZES[t.ggml_type]


@pytest.mark.parametrize("name", TYPES)
def test_no_imatrix_is_refused(name) -> None:
    w = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(LowbitError) as e:
        TYPES[name].quantize(w)
    assert "\n" not in str(e.value) and "--imatrix" in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_equals_gguf_py_and_round_trips(name) -> None:
    t = TYPES[name]
    rng = np.random.default_rng(1)
    w = sample_weights(rng, 24, 512)
    raw = t.quantize(w, random_importance(rng, 512))
    assert np.array_equal(bits(t.dequantize(raw, 512)), bits(gguf.quants.dequantize(raw, t.ggml_type)))
    params, codes = t.unpack(raw, 512)
    assert np.array_equal(t.pack(params, codes), raw)
    bad = codes.copy()
    bad[0, 0] = bad[0, 0] + 3 if bad[0, 0] < 3 else bad[0, 0] - 3
    with pytest.raises(LowbitError):  # a group of 8 with an odd count of negatives
        t.pack(params, bad)


@pytest.mark.parametrize("name", TYPES)
def test_compiled_search_equals_numpy_reference(name, monkeypatch) -> None:
    from lowbit.quant import native

    if not native.available():
        pytest.skip("no compiled search on this host")
    t = TYPES[name]
    rng = np.random.default_rng(3)
    w = sample_weights(rng, 48, 512)
    imp = random_importance(rng, 512)
    fast = t.quantize(w, imp)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert np.array_equal(t.quantize(w, imp), fast)


# ---------------------------------------------------------------- llama.cpp itself


@pytest.mark.parametrize("name", TYPES)
def test_real_blocks_equal_llamacpp(name, down_proj) -> None:
    """Real weights (layer 0 down_proj, 192 rows of 1536) with a seeded random importance."""
    t = TYPES[name]
    w = down_proj[:192]
    imp = random_importance(np.random.default_rng(4), w.shape[1])
    t0 = time.perf_counter()
    ours = t.quantize(w, imp)
    took = time.perf_counter() - t0
    theirs = ggml_quantize(t, w, imp)
    same, total = identical(t, ours, theirs)
    print(f"{name}: {same}/{total} real blocks identical to llama.cpp (lowbit {took:.2f} s)")
    assert same == total
    assert np.array_equal(bits(t.dequantize(ours, w.shape[1])), bits(gguf.quants.dequantize(ours, t.ggml_type)))


@pytest.mark.parametrize("name", TYPES)
def test_corner_cases_equal_llamacpp(name) -> None:
    """Edge-case rows (zeros, constants, underflow, outliers, ties) under importances that reach the search's
    corners: all zero (no trial is ever better), one-hot, ones, mostly zero, huge (weights overflow), tiny."""
    t = TYPES[name]
    rng = np.random.default_rng(7)
    w = sample_weights(rng, 16, 512)
    base = random_importance(rng, 512)
    imps = {"zero": np.zeros(512), "one-hot": np.eye(512)[3], "ones": np.ones(512),
            "sparse": (rng.random(512) < 0.1) * 1.0, "huge": base * 1e30, "tiny": base * 1e-38}
    for label, imp in imps.items():
        imp = imp.astype(np.float32)
        same, total = identical(t, t.quantize(w, imp), ggml_quantize(t, w, imp))
        assert same == total, f"{label}: {same}/{total}"


def activation_importance(model_dir, layers: tuple[int, ...]) -> dict[int, np.ndarray]:
    """The mean x^2 of the real inputs of mlp.down_proj (an imatrix's column means) over 512 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.calib.text import default_calib_text, read_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = tok(read_text(default_calib_text())[:20000], return_tensors="pt").input_ids[:, :512]
    sums: dict[int, list] = {}
    hooks = []
    for i in layers:
        def hook(_mod, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            s = sums.setdefault(i, [0.0, 0])
            s[0] = s[0] + (x * x).sum(0)
            s[1] += x.shape[0]
        hooks.append(model.model.layers[i].mlp.down_proj.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {i: (s / n).float().numpy() for i, (s, n) in sums.items()}


@pytest.mark.slow  # ~1 min: 3 whole real tensors x 2 types x 2 importances, and llama.cpp's search is slow
def test_real_tensors_with_activation_imatrix_equal_llamacpp(model_dir) -> None:
    from safetensors import safe_open

    layers = (0, 14, 29)
    acts = activation_importance(model_dir, layers)
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        tensors = {i: f.get_tensor(f"model.layers.{i}.mlp.down_proj.weight").astype(np.float32) for i in layers}
    rng = np.random.default_rng(5)
    edge = sample_weights(rng, 32, 1536)
    for name, t in TYPES.items():
        counts = {}
        for label, imp_of in (("activations", lambda i: acts[i]),
                              ("random", lambda i: random_importance(np.random.default_rng(i), 1536))):
            same = total = 0
            for i, w in tensors.items():
                w = np.concatenate([w, edge]) if i == 0 else w
                a, b = identical(t, t.quantize(w, imp_of(i)), ggml_quantize(t, w, imp_of(i)))
                same, total = same + a, total + b
            counts[label] = (same, total)
        print(f"{name}: " + ", ".join(f"{k} imatrix {a}/{b}" for k, (a, b) in counts.items())
              + " blocks identical to llama.cpp")
        assert all(a == b for a, b in counts.values())


@pytest.mark.slow  # ~20-40 s: llama_model_quantize twice (its IQ2 table setup alone is seconds)
@pytest.mark.parametrize("file_type", ["IQ2_XXS", "IQ2_XS"])
def test_blocks_equal_llama_model_quantize(file_type, tmp_path) -> None:
    pytest.importorskip("llama_cpp")
    from lowbit.peers.llamacpp import llamacpp_quantize

    src = tmp_path / "f32.gguf"
    f32, importance = synthetic_f32_gguf(src, np.random.default_rng(2), layers=1, ffn=512)
    out = llamacpp_quantize(src, tmp_path / f"{file_type}.gguf", file_type, imatrix_for(importance))
    same = total = 0
    names = []
    for tensor in gguf.GGUFReader(str(out)).tensors:
        t = TYPES.get(tensor.tensor_type.name)
        if t is None:
            continue
        names.append(f"{tensor.name}:{t.name}")
        a, b = identical(t, t.quantize(f32[tensor.name], importance[tensor.name]), np.asarray(tensor.data, np.uint8))
        same, total = same + a, total + b
    print(f"{file_type}: {same}/{total} blocks identical to llama.cpp over {names}")
    assert names and same == total
