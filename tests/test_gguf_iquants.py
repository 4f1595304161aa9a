"""GGUF files of llama.cpp's IQ4_NL and IQ4_XS types, written by lowbit's whole pipeline, against llama.cpp.

The judge is llama.cpp (llama-cpp-python): `llama_model_quantize` on the same F32 weights, with and without
the same imatrix, must write a file whose tensors have lowbit's types and lowbit's bytes, tensor for tensor;
and llama.cpp's runtime must compute on lowbit's files what lowbit's forward computes on their dequantization.

Two small models, both with a 4096-token placeholder vocabulary so that the embedding stays small:
  * a synthetic 8-layer Llama whose shapes reach every IQ4 rule and fallback: hidden 160 (a multiple of 32,
    not of 256: IQ4_XS falls back to IQ4_NL, the Q5_K that attn_v gets at n_gqa >= 4 falls back to Q5_1,
    the tied embedding goes to Q8_0) and ffn 512 (ffn_down keeps IQ4_XS, and its first n_layer/8 layers
    become Q5_K without an imatrix);
  * the real model's first layer (576 / 1536 wide: IQ4_NL and IQ4_XS on real weights).
llama.cpp's runtime is checked on real weights and real text (its ids folded into the vocabulary).
The block-level comparison on a 256-multiple model, and gguf-py's dequantization of every code, are in
test_ggml_blocks.py (its parametrisations over all block types include IQ4_NL and IQ4_XS).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llamacpp_judge import llamacpp_vs_lowbit
from test_ggml_blocks import random_importance, sample_weights

from lowbit.eval.data import load_tokenizer, tokenize_text
from lowbit.formats.gguf import open_gguf
from lowbit.formats.imatrix import ImatrixEntry
from lowbit.model.hf import ModelFolder
from lowbit.quant.ggml_blocks import block_type
from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf

llama_cpp = pytest.importorskip("llama_cpp")

FILE_TYPES = ("IQ4_XS", "IQ4_NL")


VOCAB = 4096  # both models keep the first 4096 rows of the embedding: the 49152-row one would dominate the time


def _imatrix(folder: Path, seed: int) -> dict[str, ImatrixEntry]:
    """A random imatrix (heavy-tailed column means, a few exact zeros) for every decoder linear."""
    rng = np.random.default_rng(seed)
    f = ModelFolder(folder)
    return {n: ImatrixEntry(random_importance(rng, f.shape(n)[1]), 1.0) for n in f.names()
            if n.startswith("model.layers.") and n.endswith("proj.weight")}


class _ToySpecials:
    """Stands in for gguf.SpecialVocab: one placeholder merge (llama.cpp's BPE loader wants merges), bos/eos."""

    chat_template = None

    def add_to_gguf(self, w, quiet: bool = False) -> None:
        w.add_token_merges(["t 0"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_add_bos_token(False)


def _toy_vocab():
    """Placeholder tokens t0..t4095 (a gpt2-type vocabulary): llama.cpp loads the file and runs on token ids."""
    from lowbit.formats.gguf_vocab import GGUFVocab

    return GGUFVocab("gpt2", "default", [f"t{i}" for i in range(VOCAB)], [1] * VOCAB, None, _ToySpecials())


def _save_folder(out: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB}, indent=2))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def real_first_layer(model_dir: Path, root: Path) -> Path:
    """The real model's first layer, final norm and first VOCAB embedding rows (tied head), saved under root."""
    folder = ModelFolder(model_dir)
    keep = {n: folder.get(n).float().numpy() for n in folder.names()
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < 1}
    keep["model.embed_tokens.weight"] = keep["model.embed_tokens.weight"][:VOCAB]
    config = {**json.loads((model_dir / "config.json").read_text()), "num_hidden_layers": 1}
    return _save_folder(root / "real-1-layer", config, keep)


@pytest.fixture(scope="module")
def real_cut(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_first_layer(model_dir, tmp_path_factory.mktemp("iq4-real"))


@pytest.fixture(scope="module")
def fallback_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic 8-layer model as an HF folder (heavy-tailed and corner-case weights)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, ffn, layers = 160, 512, 8
    config.update(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=20)
    rng = np.random.default_rng(11)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (40, hidden),
              "self_attn.v_proj": (40, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn)}
    tensors = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, hidden)) * 0.02,
               "model.norm.weight": np.ones(hidden)}
    for i in range(layers):
        for short, shape in shapes.items():
            tensors[f"model.layers.{i}.{short}.weight"] = sample_weights(rng, *shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = np.ones(hidden)
    return _save_folder(tmp_path_factory.mktemp("iq4-synthetic") / "fallback-8-layers", config, tensors)


def _f32_gguf(folder: Path, out: Path, quantize: dict[str, str] | None = None) -> Path:
    """`folder` as a GGUF with the toy vocabulary: F32, except the tensors named in `quantize` (HF name ->
    ggml type), quantized by lowbit's own search."""
    from lowbit.formats.gguf import gguf_tensor_order, write_gguf

    f = ModelFolder(folder)

    def tensors():
        for name in gguf_tensor_order(f.spec):
            qtype = (quantize or {}).get(name)
            if qtype:
                yield name, block_type(qtype).quantize(f.get(name).float().numpy()), qtype
            else:
                yield name, f.get(name), "F32"

    write_gguf(out, f.config, tensors, _toy_vocab(), file_type=0)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    """(model folder, file type, with imatrix) -> (lowbit's GGUF, llama.cpp's GGUF), built on first use."""
    from lowbit.peers.llamacpp import llamacpp_quantize

    root = tmp_path_factory.mktemp("iq4-files")
    f32: dict[Path, Path] = {}
    made: dict[tuple, tuple[Path, Path]] = {}

    def get(folder: Path, file_type: str, with_imatrix: bool) -> tuple[Path, Path]:
        key = (folder, file_type, with_imatrix)
        if key not in made:
            tag = f"{folder.name}-{file_type}-{int(with_imatrix)}"
            if folder not in f32:
                f32[folder] = _f32_gguf(folder, root / f"{folder.name}-f32.gguf")
            imat = _imatrix(folder, 5) if with_imatrix else None
            ours = root / f"lowbit-{tag}.gguf"
            quantize_to_gguf(folder, GGUFConfig(file_type, "rtn"), ours, imatrix=imat, vocab=_toy_vocab())
            made[key] = ours, llamacpp_quantize(f32[folder], root / f"llamacpp-{tag}.gguf", file_type, imat)
        return made[key]

    return get


def _compare(ours: Path, theirs: Path) -> dict[str, list[int]]:
    """Per ggml type: [identical blocks, blocks], after asserting both files hold the same tensors and types."""
    mine = {t.name: t for t in open_gguf(ours).tensors}
    ref = {t.name: t for t in open_gguf(theirs).tensors}
    assert sorted(mine) == sorted(ref)
    assert {n: t.tensor_type.name for n, t in mine.items()} == {n: t.tensor_type.name for n, t in ref.items()}
    out: dict[str, list[int]] = {}
    for name, t in ref.items():
        kind = t.tensor_type.name
        a, b = np.asarray(mine[name].data), np.asarray(t.data)
        assert a.shape == b.shape, name
        size = 1 if kind in ("F32", "F16") else block_type(kind).bytes_per_block
        same = (a.reshape(-1, size) == b.reshape(-1, size)).all(1)
        counts = out.setdefault(kind, [0, 0])
        counts[0] += int(same.sum())
        counts[1] += same.size
    return out


def _check(counts: dict[str, list[int]], label: str) -> None:
    for kind, (same, total) in sorted(counts.items()):
        print(f"{label}: {kind} {same}/{total} blocks identical")
        assert same == total, f"{label}: {kind} {same}/{total} blocks identical to llama.cpp"


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_fallback_mix_equals_llamacpp(fallback_model: Path, pair, file_type: str, with_imatrix: bool) -> None:
    """Every tensor of lowbit's IQ4 file has llama.cpp's type and llama.cpp's bytes (synthetic fallback shapes)."""
    counts = _compare(*pair(fallback_model, file_type, with_imatrix))
    _check(counts, f"synthetic {file_type} {'imatrix' if with_imatrix else 'ref'}")
    expected = {"IQ4_NL", "Q5_1", "Q8_0", "F32"} | ({"IQ4_XS"} if file_type == "IQ4_XS" else set())
    expected |= set() if with_imatrix else {"Q5_K"}  # ffn_down of layer 0 without an imatrix
    assert set(counts) == expected


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
def test_real_layers_equal_llamacpp(real_cut: Path, pair, with_imatrix: bool) -> None:
    """The real model's IQ4_XS mix (576-wide rows fall back to IQ4_NL) on real weights, byte for byte."""
    counts = _compare(*pair(real_cut, "IQ4_XS", with_imatrix))
    _check(counts, f"real 1-layer IQ4_XS {'imatrix' if with_imatrix else 'ref'}")
    assert {"IQ4_XS", "IQ4_NL"} <= set(counts)


@pytest.fixture(scope="module")
def text_ids(model_dir: Path, eval_text: Path) -> list[int]:
    """Real text's token ids folded into the 4096-token vocabulary (the frequent tokens are below it anyway)."""
    return [i % VOCAB for i in tokenize_text(load_tokenizer(model_dir), eval_text)[:128]]


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS"])
def test_llamacpp_reads_iq4_as_we_do(real_cut: Path, tmp_path: Path, text_ids: list[int], qtype: str) -> None:
    """The real layer with ffn_down (1536 wide) in `qtype`, everything else F32: with llama.cpp's activation
    rounding emulated, llama.cpp's logits on lowbit's file equal lowbit's forward on its dequantization."""
    path = _f32_gguf(real_cut, tmp_path / f"one-layer-{qtype}.gguf",
                     quantize={"model.layers.0.mlp.down_proj.weight": qtype})
    kld, top1 = llamacpp_vs_lowbit(path, text_ids)
    plain, _ = llamacpp_vs_lowbit(path, text_ids, emulate=False)
    print(f"{qtype}: KLD {kld:.2e} emulated, {plain:.2e} plain float")
    assert kld < 1e-5
    assert kld < plain / 10
    assert top1 > 0.99


def test_llamacpp_runs_whole_iq4_xs_file(real_cut: Path, pair, text_ids: list[int]) -> None:
    """llama.cpp loads lowbit's whole IQ4_XS file (the real layer, imatrix: every linear IQ4_NL or IQ4_XS, the
    tied head Q8_0) and agrees with lowbit's forward on the file's dequantization. Whole quantized layers
    leave llama.cpp's multi-matmul residue (test_gguf_export), hence the looser bound than the test above."""
    ours, _ = pair(real_cut, "IQ4_XS", True)
    kld, top1 = llamacpp_vs_lowbit(ours, text_ids)
    print(f"IQ4_XS 1-layer file: llama.cpp vs lowbit forward KLD {kld:.2e}, top-1 {top1:.3f}")
    assert kld < 2e-3 and top1 > 0.95
    assert int(open_gguf(ours).fields["general.file_type"].contents()) == 30  # LLAMA_FTYPE_MOSTLY_IQ4_XS


@pytest.mark.slow  # ~15 s (calibration, GPTQ); the GPTQ-onto-IQ4 algorithm itself is in test_gguf_calibrated.py
def test_gptq_iq4_xs_file_runs_in_llamacpp(real_cut: Path, pair, text_ids: list[int], model_dir: Path,
                                           tmp_path: Path) -> None:
    """GPTQ onto the IQ4 grids (calibrated, act-order): llama.cpp's IQ4_XS layout, and llama.cpp computes with the
    file what lowbit computes on its dequantization, as closely as on the RTN file's bytes (llama.cpp's own)."""
    from lowbit.calib.dataset import CalibConfig, CalibSet, build_calibration
    from lowbit.calib.text import resolve_text
    from lowbit.formats.gguf import gguf_name_to_hf
    from lowbit.quant.gguf_pipeline import plan_types

    real = build_calibration(load_tokenizer(model_dir), resolve_text(None, "wiki-calib"), CalibConfig(4, 128, 0, "chunk"),
                             8192)
    calib = CalibSet(real.tokens % VOCAB)
    out = tmp_path / "gptq.gguf"
    quantize_to_gguf(real_cut, GGUFConfig("IQ4_XS", "gptq"), out, calib=calib, vocab=_toy_vocab())
    written = {gguf_name_to_hf(t.name)[0]: t.tensor_type.name for t in open_gguf(out).tensors}
    assert written == plan_types(ModelFolder(real_cut), GGUFConfig("IQ4_XS"), False)
    rtn, _ = pair(real_cut, "IQ4_XS", False)
    kld, top1 = llamacpp_vs_lowbit(out, text_ids)
    own_kld, _ = llamacpp_vs_lowbit(rtn, text_ids)
    print(f"IQ4_XS gptq: llama.cpp vs lowbit KLD {kld:.2e} (top-1 {top1:.3f}); on the RTN bytes {own_kld:.2e}")
    assert kld < 2 * own_kld + 1e-4 and top1 > 0.95
