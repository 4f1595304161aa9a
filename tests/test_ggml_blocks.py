"""lowbit.quant.ggml_blocks against independent references.

  * gguf-py's own quantizers (legacy types) and dequantizers (all types);
  * llama.cpp's quantizer itself (llama_model_quantize via llama-cpp-python),
    with and without an imatrix, on a synthetic Llama whose widths are
    multiples of 256 and on the real default model; blocks are compared byte
    for byte in whatever type llama.cpp chose for each tensor.
"""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.ggml_blocks import TYPES, block_type, nearest_int

LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# llama.cpp file type whose mix writes mostly this block type
FILE_TYPE = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
             "Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K",
             "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS"}
REAL_LAYERS = (0, 3, 4, 29)  # under Q4_K_M: ffn_down is Q6_K in 0 and 29, Q4_K in 3 and 4


def heavy(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return (rng.standard_t(2.5, size=shape) * 0.02).astype(np.float32)


def edge_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows that reach ggml's corner cases: all-zero and constant blocks, fp16 underflow,
    outliers that zero sub-block scales (so the search codes survive), exact rounding ties."""
    t = lambda: heavy(rng, (n,))  # noqa: E731
    rows = [np.zeros(n), np.full(n, 0.01), np.full(n, -0.01), t() * 1e-7, t() * 1e-4, np.abs(t()), -np.abs(t()),
            rng.integers(-4, 5, size=n) * 0.25, rng.integers(0, 3, size=n) * 0.125, t() * 200,
            np.where(rng.random(n) < 0.02, t() * 50, t() * 0.001)]
    r = t() * 0.01
    r[::256] = 5.0
    rows.append(r)
    r = t()
    r[::64] = -3.0
    rows.append(r)
    r = t()
    r[: n // 2] = 0
    rows.append(r)
    r = t()
    r[16:48] = 0
    r[100:116] = 1e-30
    rows.append(r)
    r = t()
    r[::2] = 0
    rows.append(r)
    return np.stack(rows).astype(np.float32)


def sample_weights(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    w = heavy(rng, (rows, n))
    e = edge_rows(rng, n)
    w[: len(e)] = e
    return w


def random_importance(rng: np.random.Generator, n: int) -> np.ndarray:
    """imatrix-like column means of x^2: heavy-tailed, a few exact zeros."""
    v = rng.gamma(0.5, 2.0, size=n) * np.where(rng.random(n) < 0.01, 100.0, 1.0)
    return np.where(rng.random(n) < 0.03, 0.0, v).astype(np.float32)


def block_match(ours: np.ndarray, theirs: np.ndarray, bytes_per_block: int) -> np.ndarray:
    return (ours.reshape(-1, bytes_per_block) == theirs.reshape(-1, bytes_per_block)).all(axis=1)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture(scope="session")
def real_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    names = ("model.layers.0.mlp.down_proj.weight", "model.layers.7.self_attn.q_proj.weight",
             "model.layers.12.mlp.gate_proj.weight")
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        return {n: f.get_tensor(n).astype(np.float32) for n in names}


# ---------------------------------------------------------------- format and API


def test_sizes_and_lookup():
    for name, t in TYPES.items():
        assert t.name == name and t.ggml_type.name == name
        assert (t.block, t.bytes_per_block) == gguf.GGML_QUANT_SIZES[t.ggml_type]
        assert t.block % t.sub == 0 and 0 <= t.qmin <= t.zero <= t.qmax <= 255
    assert block_type("q4_k") is TYPES["Q4_K"]
    with pytest.raises(LowbitError) as e:
        block_type("Q7_K")
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in TYPES)
    with pytest.raises(LowbitError):
        TYPES["Q4_K"].fit(np.zeros((2, 100), np.float32))
    q4 = TYPES["Q4_0"]
    w = np.ones((1, 32), np.float32)
    with pytest.raises(LowbitError):
        q4.pack(q4.fit(w), np.full((1, 32), 16, np.uint8))


def test_nearest_int_is_round_half_even():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 3.7, -3.7, 4194303.0, -0.0], np.float32)
    assert nearest_int(v).tolist() == np.rint(v).astype(int).tolist()


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_match_gguf_py(name, real_tensors):
    t = TYPES[name]
    for w in [*real_tensors.values(), sample_weights(np.random.default_rng(1), 64, 1024)]:
        assert np.array_equal(t.quantize(w), gguf.quants.quantize(w, t.ggml_type))


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_is_exact_and_pack_round_trips(name, real_tensors):
    t = TYPES[name]
    rng = np.random.default_rng(2)
    w = np.concatenate([sample_weights(rng, 48, 512), real_tensors["model.layers.0.mlp.down_proj.weight"][:32, :512]])
    for importance in _importances(t, random_importance(rng, w.shape[1]), w):
        params = t.fit(w, importance)
        assert all(v.shape[:2] == (w.shape[0], w.shape[1] // t.block) for v in params.values())
        codes = t.codes(w, params)
        raw = t.pack(params, codes)
        assert np.array_equal(raw, t.quantize(w, importance))
        # every code of the range, not just the ones the search picked (grid i-quants: any grid point, any signs)
        if t.search_only:
            blocks = w.size // t.block
            any_codes = t._codes_from(rng.integers(0, len(t.tables[0]), size=(blocks, t.block // t.group)),
                                      rng.integers(0, 128 if t.fold_signs else 256, size=(blocks, t.block // 8))
                                      ).reshape(w.shape)
        else:
            any_codes = rng.integers(t.qmin, t.qmax + 1, size=w.shape).astype(np.uint8)
        for c in (codes, any_codes):
            packed = t.pack(params, c)
            ref = gguf.quants.dequantize(packed, t.ggml_type)
            scale, bias = t.effective(params)
            formula = scale.repeat(t.sub, axis=1) * t.code_values(c) + bias.repeat(t.sub, axis=1)
            assert np.array_equal(bits(t.dequantize(packed, w.shape[1])), bits(ref))
            assert np.array_equal(bits(formula), bits(ref))
            p2, c2 = t.unpack(packed, w.shape[1])
            assert np.array_equal(c2, c)
            assert np.array_equal(t.pack(p2, c2), packed)
            for k, v in p2.items():
                assert np.array_equal(np.asarray(v).view(np.uint8), np.asarray(params[k]).view(np.uint8)), k


def _importances(t, imp: np.ndarray, w: np.ndarray) -> tuple:
    """(None, imp), or (imp,) for a type that refuses to fit without an importance (checked here: one line)."""
    if not t.needs_importance:
        return None, imp
    with pytest.raises(LowbitError, match="--imatrix") as e:
        t.fit(w, None)
    assert "\n" not in str(e.value)
    return (imp,)


@pytest.mark.parametrize("name", [n for n in TYPES if n not in LEGACY])
def test_column_slices_fit_like_the_whole(name):
    """k-quant blocks only look at themselves, so per-slice params concatenate into the full fit."""
    t = TYPES[name]
    rng = np.random.default_rng(3)
    w = sample_weights(rng, 24, 768)
    imp = random_importance(rng, 768)
    for importance in _importances(t, imp, w):
        whole = t.fit(w, importance)
        parts = [t.fit(w[:, a:a + 256], None if importance is None else importance[a:a + 256]) for a in (0, 256, 512)]
        for k, v in whole.items():
            assert np.array_equal(np.concatenate([p[k] for p in parts], axis=1), v), k


# ---------------------------------------------------------------- llama.cpp itself


def quantize_with_cache(cache: dict, t, name: str, w: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    key = (name, t.name, importance is not None)
    if key not in cache:
        cache[key] = t.quantize(w, importance)
    return cache[key]


def compare_with_llamacpp(path: Path, f32: dict[str, np.ndarray], importance: dict[str, np.ndarray],
                          cache: dict, only=lambda name: True) -> dict[str, tuple[int, int]]:
    """Per block type: (identical blocks, blocks) over every tensor llama.cpp block-quantized in `path`."""
    out: dict[str, tuple[int, int]] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        t = TYPES.get(tensor.tensor_type.name)
        if t is None or not only(tensor.name):
            continue
        w = np.asarray(f32[tensor.name], dtype=np.float32)
        ours = quantize_with_cache(cache, t, tensor.name, w, importance.get(tensor.name))
        same = block_match(ours, np.asarray(tensor.data, dtype=np.uint8), t.bytes_per_block)
        a, b = out.get(t.name, (0, 0))
        out[t.name] = (a + int(same.sum()), b + same.size)
    return out


def read_f32(path: Path) -> dict[str, np.ndarray]:
    """An F32 GGUF's tensors as [rows, n] views of the file (llama.cpp's row order)."""
    return {t.name: t.data.reshape([int(x) for x in reversed(t.shape)]) for t in gguf.GGUFReader(str(path)).tensors}


def imatrix_for(importance_by_gguf_name: dict[str, np.ndarray]):
    from lowbit.formats.gguf import gguf_name_to_hf
    from lowbit.formats.imatrix import ImatrixEntry

    return {gguf_name_to_hf(k)[0]: ImatrixEntry(v, 1.0) for k, v in importance_by_gguf_name.items()}


class _ToySpecials:
    """Stands in for gguf.SpecialVocab for a vocabulary made of placeholder tokens."""

    chat_template = None

    def add_to_gguf(self, w, quiet: bool = False) -> None:
        w.add_token_merges([])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_add_bos_token(False)


def synthetic_f32_gguf(path: Path, rng: np.random.Generator, layers: int, ffn: int, hidden: int = 256,
                       vocab: int = 256) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Write a small Llama (4 heads, 2 KV heads, tied head) with heavy-tailed and corner-case weights as an
    F32 GGUF at `path`; return its tensors by GGUF name and a random importance for every 2-D tensor but
    token_embd (what llama.cpp gets as the imatrix)."""
    from lowbit.formats.gguf import write_gguf
    from lowbit.formats.gguf_vocab import GGUFVocab

    cfg = {"hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True}  # no output.weight: llama.cpp uses token_embd as the head
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden // 2, hidden),
              "self_attn.v_proj": (hidden // 2, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn)}
    tensors = {"model.embed_tokens.weight": sample_weights(rng, vocab, hidden), "model.norm.weight": np.ones(hidden)}
    for i in range(layers):
        for short, shape in shapes.items():
            tensors[f"model.layers.{i}.{short}.weight"] = sample_weights(rng, *shape)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(hidden)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(hidden)
    tok = GGUFVocab("gpt2", "default", [f"t{i}" for i in range(vocab)], [1] * vocab, None, _ToySpecials())
    write_gguf(path, cfg, lambda: ((k, torch.from_numpy(np.asarray(v, np.float32)), "F32")
                                   for k, v in tensors.items()), tok)
    f32 = read_f32(path)
    importance = {k: random_importance(rng, v.shape[1]) for k, v in f32.items()
                  if v.ndim == 2 and k != "token_embd.weight"}
    return f32, importance


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A 2-layer Llama (hidden 256, ffn 512) with heavy-tailed and corner-case weights as an F32 GGUF,
    and a lazily filled cache of llama.cpp quantizations of it."""
    pytest.importorskip("llama_cpp")
    from lowbit.peers.llamacpp import llamacpp_quantize

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("ggml_blocks_synthetic")
    src = root / "f32.gguf"
    f32, importance = synthetic_f32_gguf(src, rng, layers=2, ffn=512)
    files: dict[tuple[str, bool], Path] = {}

    def quantized(name: str, with_imatrix: bool) -> Path:
        key = (name, with_imatrix)
        if key not in files:
            files[key] = llamacpp_quantize(src, root / f"{name}-{int(with_imatrix)}.gguf", FILE_TYPE[name],
                                           imatrix_for(importance) if with_imatrix else None)
        return files[key]

    return {"f32": f32, "importance": importance, "quantized": quantized, "cache": {}}


def _synthetic_cases():
    """(type, with imatrix) pairs; IQ2 with an imatrix is -m slow here (the default suite has it in
    test_gguf_iq2_files.py, on a whole 8-layer mix, and in test_iq2.py block by block). IQ3_XXS, IQ3_S and
    IQ2_S have no FILE_TYPE here: test_iq3_s_iq2_s.py / test_iq3_xxs.py compare them block by block and
    test_gguf_iq3_xxs_files.py in llama.cpp's IQ3_XXS mix."""
    for name in FILE_TYPE:
        for imat in (False, True):
            slow = (pytest.mark.slow,) if TYPES[name].needs_importance and imat else ()
            yield pytest.param(name, imat, id=f"{name}-{'imatrix' if imat else 'ref'}", marks=slow)


@pytest.mark.parametrize("name, with_imatrix", list(_synthetic_cases()))
def test_blocks_match_llamacpp_synthetic(synthetic, name, with_imatrix):
    if TYPES[name].needs_importance and not with_imatrix:
        # llama.cpp refuses the file type without an imatrix (before quantizing anything); so does lowbit
        with pytest.raises(LowbitError, match="could not quantize"):
            synthetic["quantized"](name, with_imatrix)
        with pytest.raises(LowbitError, match="--imatrix"):
            TYPES[name].quantize(synthetic["f32"]["blk.0.ffn_down.weight"])
        return
    path = synthetic["quantized"](name, with_imatrix)
    result = compare_with_llamacpp(path, synthetic["f32"], synthetic["importance"] if with_imatrix else {},
                                   synthetic["cache"])
    assert name in result, f"llama.cpp's {FILE_TYPE[name]} mix wrote no {name} tensor"
    for t, (same, total) in result.items():
        print(f"synthetic {FILE_TYPE[name]} {'imatrix' if with_imatrix else 'ref'}: {t} {same}/{total} identical")
        assert same == total, f"{t}: {same}/{total} blocks identical to llama.cpp ({same / total:.4f})"


@pytest.fixture(scope="session")
def real_quantized(model_dir, tmp_path_factory):
    """The default model as an F32 GGUF and llama.cpp's Q4_K_M of it, with and without an imatrix.

    Q4_K_M alone covers both k-quants on real weights: its mix writes ffn_down (1536 wide) as Q6_K in
    layers 0 and 29 and as Q4_K in layers 3 and 4, and the 576-wide tensors fall back to Q5_0 / Q8_0."""
    pytest.importorskip("llama_cpp")
    from lowbit.formats.gguf import hf_folder_to_gguf
    from lowbit.peers.llamacpp import llamacpp_quantize

    root = tmp_path_factory.mktemp("ggml_blocks_real")
    src = hf_folder_to_gguf(model_dir, root / "f32.gguf")
    f32 = read_f32(src)
    rng = np.random.default_rng(4)
    importance = {k: random_importance(rng, v.shape[1]) for k, v in f32.items()
                  if k.startswith(tuple(f"blk.{i}." for i in REAL_LAYERS)) and v.ndim == 2}
    files = {False: llamacpp_quantize(src, root / "q4_k_m.gguf", "Q4_K_M"),
             True: llamacpp_quantize(src, root / "q4_k_m-imatrix.gguf", "Q4_K_M", imatrix_for(importance))}
    yield {"f32": f32, "importance": importance, "files": files, "cache": {}}
    del f32
    for p in [src, *files.values()]:  # ~1 GB: don't leave it in pytest's kept temp dirs
        p.unlink(missing_ok=True)


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
def test_blocks_match_llamacpp_real_model(real_quantized, with_imatrix):
    r = real_quantized
    layers = tuple(f"blk.{i}." for i in REAL_LAYERS)
    result = compare_with_llamacpp(r["files"][with_imatrix], r["f32"], r["importance"] if with_imatrix else {},
                                   r["cache"], only=lambda name: name.startswith(layers))
    assert {"Q4_K", "Q6_K"} <= set(result)  # the ffn_down tensors
    for t, (same, total) in result.items():
        print(f"real Q4_K_M {'imatrix' if with_imatrix else 'ref'}: {t} {same}/{total} identical")
        assert same == total, f"{t}: {same}/{total} blocks identical to llama.cpp ({same / total:.4f})"


def test_q4_k_speed(real_tensors, capsys):
    w = real_tensors["model.layers.0.mlp.down_proj.weight"]
    t = TYPES["Q4_K"]
    imp = random_importance(np.random.default_rng(5), w.shape[1])
    timings = []
    for importance in (None, imp):
        start = time.perf_counter()
        t.quantize(w, importance)
        timings.append(time.perf_counter() - start)
    with capsys.disabled():
        print(f"\nQ4_K quantize {w.shape[0]}x{w.shape[1]}: {timings[0]:.3f} s without imatrix, "
              f"{timings[1]:.3f} s with")
