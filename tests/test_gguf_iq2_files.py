"""GGUF files of llama.cpp's IQ2_XXS and IQ2_XS types (ftypes 19, 20), written by lowbit's whole pipeline,
against llama.cpp (llama-cpp-python), as test_gguf_iquants.py does for IQ4_NL / IQ4_XS.

`llama_model_quantize` on the same F32 weights with the same imatrix must write a file whose tensors have
lowbit's types and lowbit's bytes, tensor for tensor, and llama.cpp's runtime must compute on lowbit's file what
lowbit's forward computes on its dequantization. The block-level search itself (every block of real rows and
corner cases against ggml_quantize_chunk, gguf-py's dequantization) is in test_iq2.py.

Two models, each reaching a part of llama.cpp's IQ2 mix:
  * a synthetic 8-layer Llama with 256-multiple widths (hidden and ffn 256), n_gqa 4, an untied head:
    output Q5_K, token_embd Q2_K, attn_v Q4_K (n_gqa >= 4), the first n_layer/8 ffn_down Q2_K, the rest IQ2;
  * the real model's first layer (576 / 1536 wide, n_gqa 3, tied head): the 576-wide IQ2 tensors fall back to
    IQ4_NL, attn_v's Q2_K (n_gqa < 4) to Q4_0, the tied head to Q8_0; ffn_down (1536) is real IQ2.
Without an imatrix, lowbit refuses before any work, in one line naming --imatrix (llama.cpp refuses too).

Suite budget: the default suite checks IQ2_XXS on the synthetic model and IQ2_XS on the real layer (the mix
rules are the same code for both, the block searches are test_iq2.py's); the other pairings, GPTQ on an IQ2
mix and the whole real model are -m slow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from llamacpp_judge import llamacpp_vs_lowbit
from test_gguf_iquants import (VOCAB, _check, _compare, _f32_gguf, _imatrix, _save_folder, _toy_vocab,
                               real_first_layer)
from test_ggml_blocks import sample_weights

from lowbit.errors import LowbitError
from lowbit.formats.gguf import open_gguf
from lowbit.model.hf import ModelFolder
from lowbit.quant.ggml_blocks import block_type
from lowbit.quant.gguf_pipeline import GGUFConfig, plan_types, quantize_to_gguf

llama_cpp = pytest.importorskip("llama_cpp")

IQ2 = ("IQ2_XXS", "IQ2_XS")
SLOW_XS = ("IQ2_XXS", pytest.param("IQ2_XS", marks=pytest.mark.slow))
SLOW_XXS = (pytest.param("IQ2_XXS", marks=pytest.mark.slow), "IQ2_XS")
FTYPE_ID = {"IQ2_XXS": 19, "IQ2_XS": 20}


def synthetic_256_folder(model_dir: Path, root: Path, kv_heads: int, seed: int) -> Path:
    """8 layers, hidden 256 (8 heads of 32, `kv_heads` kv heads), ffn 256, untied head; heavy-tailed and
    corner-case weights drawn with `seed`. n_gqa (8 / kv_heads) picks llama.cpp's attn_v rule."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, ffn, layers, kv = 256, 256, 8, 32 * kv_heads
    config.update(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=kv_heads, head_dim=32, tie_word_embeddings=False)
    rng = np.random.default_rng(seed)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn)}
    tensors = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, hidden)) * 0.02,
               "lm_head.weight": sample_weights(rng, VOCAB, hidden), "model.norm.weight": np.ones(hidden)}
    for i in range(layers):
        for short, shape in shapes.items():
            tensors[f"model.layers.{i}.{short}.weight"] = sample_weights(rng, *shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = np.ones(hidden)
    return _save_folder(root / "synthetic-256-8-layers", config, tensors)


@pytest.fixture(scope="module")
def synthetic256(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 kv heads: n_gqa 4, so attn_v takes llama.cpp's Q4_K rule."""
    return synthetic_256_folder(model_dir, tmp_path_factory.mktemp("iq2-synthetic"), kv_heads=2, seed=19)


@pytest.fixture(scope="module")
def real_layer(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model's first layer, final norm and first 4096 embedding rows (tied head), as test_gguf_iquants's."""
    return real_first_layer(model_dir, tmp_path_factory.mktemp("iq2-real"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    """(model folder, file type) -> (lowbit's GGUF, llama.cpp's GGUF, seconds each), both with the same imatrix,
    built on first use."""
    from lowbit.peers.llamacpp import llamacpp_quantize

    root = tmp_path_factory.mktemp("iq2-files")
    f32: dict[Path, Path] = {}
    made: dict[tuple, tuple[Path, Path, float, float]] = {}

    def get(folder: Path, file_type: str):
        key = (folder, file_type)
        if key not in made:
            tag = f"{folder.name}-{file_type}"
            if folder not in f32:
                f32[folder] = _f32_gguf(folder, root / f"{folder.name}-f32.gguf")
            imat = _imatrix(folder, 5)
            ours = root / f"lowbit-{tag}.gguf"
            t0 = time.perf_counter()
            quantize_to_gguf(folder, GGUFConfig(file_type, "rtn"), ours, imatrix=imat, vocab=_toy_vocab())
            t1 = time.perf_counter()
            theirs = llamacpp_quantize(f32[folder], root / f"llamacpp-{tag}.gguf", file_type, imat)
            made[key] = ours, theirs, t1 - t0, time.perf_counter() - t1
        return made[key]

    return get


@pytest.fixture(scope="module")
def text_ids(model_dir: Path, eval_text: Path) -> list[int]:
    """128 tokens of real text folded into the 4096-token vocabulary (the `tokenizers` library alone: importing
    transformers would cost more than the checks here)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(eval_text.read_text()[:4000]).ids
    assert len(ids) >= 128
    return [i % VOCAB for i in ids[:128]]


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in open_gguf(path).tensors}


@pytest.mark.parametrize("file_type", SLOW_XS)
def test_synthetic_256_mix_equals_llamacpp(synthetic256: Path, pair, file_type: str) -> None:
    """Every tensor of lowbit's IQ2 file has llama.cpp's type and llama.cpp's bytes (256-multiple widths)."""
    ours, theirs, t_ours, t_theirs = pair(synthetic256, file_type)
    counts = _compare(ours, theirs)
    _check(counts, f"synthetic-256 {file_type} imatrix")
    print(f"{file_type}: lowbit {t_ours:.1f} s, llama.cpp {t_theirs:.1f} s")
    types = _types(ours)
    assert set(counts) == {file_type, "Q2_K", "Q4_K", "Q5_K", "F32"}
    assert types["output.weight"] == "Q5_K" and types["token_embd.weight"] == "Q2_K"
    assert {types[f"blk.{i}.attn_v.weight"] for i in range(8)} == {"Q4_K"}
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == ["Q2_K"] + [file_type] * 7
    assert int(open_gguf(ours).fields["general.file_type"].contents()) == FTYPE_ID[file_type]


@pytest.mark.parametrize("file_type", SLOW_XXS)
def test_real_layer_mix_equals_llamacpp(real_layer: Path, pair, file_type: str) -> None:
    """The real model's IQ2 fallback mix on real weights, byte for byte: 576-wide rows in IQ4_NL, attn_v's
    Q2_K in Q4_0, the tied head in Q8_0, ffn_down (1536 wide) in IQ2."""
    ours, theirs, t_ours, t_theirs = pair(real_layer, file_type)
    counts = _compare(ours, theirs)
    _check(counts, f"real 1-layer {file_type} imatrix")
    print(f"{file_type}: lowbit {t_ours:.1f} s, llama.cpp {t_theirs:.1f} s")
    types = _types(ours)
    assert set(counts) == {file_type, "IQ4_NL", "Q4_0", "Q8_0", "F32"}
    assert types["blk.0.ffn_down.weight"] == file_type and types["blk.0.attn_v.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0"


@pytest.mark.parametrize("qtype", SLOW_XS)
def test_llamacpp_reads_iq2_as_we_do(real_layer: Path, tmp_path: Path, text_ids: list[int],
                                     qtype: str) -> None:
    """The real layer with ffn_down (1536 wide) in `qtype`, everything else F32: with llama.cpp's activation
    rounding emulated, llama.cpp's logits on lowbit's blocks equal lowbit's forward on them."""
    from lowbit.formats.gguf import gguf_tensor_order, write_gguf

    f = ModelFolder(real_layer)
    down = "model.layers.0.mlp.down_proj.weight"
    imp = _imatrix(real_layer, 5)[down].mean()

    def tensors():
        for name in gguf_tensor_order(f.spec):
            if name == down:
                yield name, block_type(qtype).quantize(f.get(name).float().numpy(), imp), qtype
            else:
                yield name, f.get(name), "F32"

    path = tmp_path / f"one-layer-{qtype}.gguf"
    write_gguf(path, f.config, tensors, _toy_vocab(), file_type=0)
    kld, top1 = llamacpp_vs_lowbit(path, text_ids)
    plain, _ = llamacpp_vs_lowbit(path, text_ids, emulate=False)
    print(f"{qtype} ffn_down: KLD {kld:.2e} emulated, {plain:.2e} plain float, top-1 {top1:.3f}")
    assert kld < 1e-5 and kld < plain / 10 and top1 > 0.99


def test_llamacpp_runs_whole_iq2_xs_file(real_layer: Path, pair, text_ids: list[int]) -> None:
    """llama.cpp loads lowbit's whole IQ2_XS file (the real layer: IQ2_XS, IQ4_NL, Q4_0, the tied head Q8_0) and
    agrees with lowbit's forward on the file's dequantization (the multi-matmul residue of test_gguf_export)."""
    ours, _, _, _ = pair(real_layer, "IQ2_XS")
    kld, top1 = llamacpp_vs_lowbit(ours, text_ids)
    print(f"IQ2_XS 1-layer file: llama.cpp vs lowbit forward KLD {kld:.2e}, top-1 {top1:.3f}")
    assert kld < 2e-3 and top1 > 0.95


def test_no_imatrix_is_refused_before_any_work(capsys, model_dir: Path, tmp_path: Path) -> None:
    """`--type IQ2_XS` without --imatrix: exit 2, one line naming --imatrix, nothing written; also the API."""
    from lowbit.cli import main

    for file_type in IQ2:
        out = tmp_path / f"{file_type}.gguf"
        t0 = time.perf_counter()
        code = main(["quantize", str(model_dir), "--format", "gguf", "--type", file_type, "-o", str(out)])
        seconds = time.perf_counter() - t0
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("lowbit: error:"), err
        assert "--imatrix" in lines[0] and file_type in lines[0]
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))
        assert seconds < 10  # refused at plan time
    with pytest.raises(LowbitError, match="--imatrix"):
        quantize_to_gguf(model_dir, GGUFConfig("IQ2_XXS", "gptq"), tmp_path / "api.gguf")


def test_imatrix_gaps_are_refused(real_layer: Path, synthetic256: Path, tmp_path: Path) -> None:
    """An imatrix without the IQ2 tensor, or an IQ2 override on the (256-wide) embedding, which has no imatrix,
    is one line."""
    imat = _imatrix(real_layer, 5)
    del imat["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(LowbitError, match="no entry for model.layers.0.mlp.down_proj.weight") as e:
        quantize_to_gguf(real_layer, GGUFConfig("IQ2_XS"), tmp_path / "a.gguf", imatrix=imat, vocab=_toy_vocab())
    assert "\n" not in str(e.value)
    with pytest.raises(LowbitError, match="model.embed_tokens.weight as IQ2_XXS") as e:
        quantize_to_gguf(synthetic256, GGUFConfig("Q4_K_M", tensor_types=("token_embd=IQ2_XXS",)),
                         tmp_path / "b.gguf", imatrix=_imatrix(synthetic256, 5), vocab=_toy_vocab())
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_full_model_plan_counts(model_dir: Path) -> None:
    """llama.cpp's IQ2 rules on SmolLM2's 30 layers (n_gqa 3, tied, 576 / 1536 wide): ffn_down Q2_K in the
    first 30/8 = 3 layers, IQ2 after; attn_v Q2_K -> Q4_0; the rest IQ2 -> IQ4_NL; the tied embedding Q8_0."""
    for file_type in IQ2:
        types = plan_types(ModelFolder(model_dir), GGUFConfig(file_type), has_imatrix=True)
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        assert counts == {"IQ4_NL": 150, "Q4_0": 30, "Q2_K": 3, file_type: 27, "Q8_0": 1, "F32": 61}
        downs = [types[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(30)]
        assert downs == ["Q2_K"] * 3 + [file_type] * 27


@pytest.mark.slow  # ~40 s on 2 loaded cores: calibration and GPTQ on the real layer
def test_gptq_iq2_file_runs_in_llamacpp(real_layer: Path, pair, text_ids: list[int], model_dir: Path,
                                        tmp_path: Path) -> None:
    """--method gptq on an IQ2_XS mix: GPTQ onto every tensor, the IQ2_XS ffn_down included (grid groups swept in
    column order, headers from llama.cpp's search on the updated weights: lowbit.quant.gptq_blocks), so its bytes
    differ from the RTN file's; llama.cpp runs the file as lowbit reads it."""
    from lowbit.calib.dataset import CalibConfig, CalibSet, build_calibration
    from lowbit.calib.text import resolve_text
    from lowbit.eval.data import load_tokenizer

    real = build_calibration(load_tokenizer(model_dir), resolve_text(None, "wiki-calib"), CalibConfig(4, 128, 0, "chunk"),
                             8192)
    out = tmp_path / "gptq.gguf"
    quantize_to_gguf(real_layer, GGUFConfig("IQ2_XS", "gptq"), out, calib=CalibSet(real.tokens % VOCAB),
                     imatrix=_imatrix(real_layer, 5), vocab=_toy_vocab())
    rtn, _, _, _ = pair(real_layer, "IQ2_XS")
    mine = {t.name: t for t in open_gguf(out).tensors}
    ref = {t.name: t for t in open_gguf(rtn).tensors}
    assert {n: t.tensor_type.name for n, t in mine.items()} == {n: t.tensor_type.name for n, t in ref.items()}
    assert not np.array_equal(np.asarray(mine["blk.0.ffn_down.weight"].data),
                              np.asarray(ref["blk.0.ffn_down.weight"].data))
    assert not np.array_equal(np.asarray(mine["blk.0.ffn_up.weight"].data), np.asarray(ref["blk.0.ffn_up.weight"].data))
    kld, top1 = llamacpp_vs_lowbit(out, text_ids)
    print(f"IQ2_XS gptq 1-layer file: llama.cpp vs lowbit KLD {kld:.2e}, top-1 {top1:.3f}")
    assert kld < 2e-3 and top1 > 0.95


@pytest.mark.slow  # ~10 min on 2 loaded cores: both quantizers over the whole 30-layer model
def test_whole_real_model_iq2_xs_equals_llamacpp(model_dir: Path, tmp_path: Path) -> None:
    """The whole real model (its own vocabulary), IQ2_XS with a random imatrix on every decoder linear: llama.cpp's
    types (ffn_down Q2_K in the first 3 of 30 layers) and bytes, tensor for tensor."""
    from lowbit.formats.gguf import hf_folder_to_gguf
    from lowbit.peers.llamacpp import llamacpp_quantize

    imat = _imatrix(model_dir, 7)
    ours = tmp_path / "lowbit.gguf"
    quantize_to_gguf(model_dir, GGUFConfig("IQ2_XS"), ours, imatrix=imat)
    f32 = hf_folder_to_gguf(model_dir, tmp_path / "f32.gguf")
    theirs = llamacpp_quantize(f32, tmp_path / "llamacpp.gguf", "IQ2_XS", imat)
    f32.unlink()
    _check(_compare(ours, theirs), "real 30-layer IQ2_XS imatrix")
    assert [_types(ours)[f"blk.{i}.ffn_down.weight"] for i in range(30)] == ["Q2_K"] * 3 + ["IQ2_XS"] * 27
