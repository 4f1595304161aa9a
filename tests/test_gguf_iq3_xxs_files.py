"""GGUF files of llama.cpp's IQ3_XXS type (ftype 23), written by lowbit's whole pipeline, against llama.cpp
(llama-cpp-python), as test_gguf_iq2_files.py does for IQ2_XXS / IQ2_XS.

`llama_model_quantize` on the same F32 weights with the same imatrix (or none) must write a file whose tensors
have lowbit's types and lowbit's bytes, tensor for tensor, and llama.cpp's runtime must compute on lowbit's file
what lowbit's forward computes on its dequantization. The block-level searches (IQ3_XXS, IQ3_S, IQ2_S against
ggml_quantize_chunk, gguf-py's dequantization) are in test_iq3_xxs.py and test_iq3_s_iq2_s.py.

Models, each reaching a part of llama.cpp's IQ3_XXS mix:
  * a synthetic 8-layer Llama with 256-multiple widths (hidden and ffn 256), n_gqa 2, an untied head,
    heavy-tailed and corner-case weights: output Q5_K, token_embd IQ3_S (no imatrix entry: IQ3_S's own
    weights), attn_q / attn_k IQ2_S, attn_output IQ3_S, attn_v (n_gqa < 4, imatrix) and the ffn IQ3_XXS;
  * the real model's first layer cut to 256-multiple widths (hidden 512: 8 query heads, 2 KV heads, so n_gqa 4;
    ffn 1536), untied: the same mix on real weights with attn_v Q4_K; llama.cpp runs this file;
  * the real model's first layer (576 / 1536 wide, n_gqa 3, tied head): every 576-wide tensor falls back to
    IQ4_NL, the head to Q8_0, ffn_down is IQ3_XXS with an imatrix and Q3_K without one (the first n_layer/8
    layers Q4_K), so llama.cpp writes this mix without an imatrix, and so does lowbit.
On 256-multiple models the mix has IQ2_S / IQ3_XXS tensors, which llama.cpp refuses without an imatrix; lowbit
refuses before any work, in one line naming --imatrix.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from llamacpp_judge import llamacpp_vs_lowbit
from test_gguf_iq2_files import synthetic_256_folder
from test_gguf_iquants import (VOCAB, _check, _compare, _f32_gguf, _imatrix, _save_folder, _toy_vocab,
                               real_first_layer)

from lowbit.errors import LowbitError
from lowbit.formats.gguf import open_gguf
from lowbit.model.hf import ModelFolder
from lowbit.quant.gguf_mix import TensorInfo, choose_types
from lowbit.quant.gguf_pipeline import GGUFConfig, check_plan, plan_types, quantize_to_gguf

llama_cpp = pytest.importorskip("llama_cpp")

LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
MIX_256 = {"attn_q": "IQ2_S", "attn_k": "IQ2_S", "attn_output": "IQ3_S", "ffn_gate": "IQ3_XXS", "ffn_up": "IQ3_XXS",
           "ffn_down": "IQ3_XXS"}


@pytest.fixture(scope="module")
def synthetic256(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 layers, hidden 256, 4 KV heads: n_gqa 2, so attn_v is IQ3_XXS with an imatrix (test_gguf_iq2_files's
    builder)."""
    return synthetic_256_folder(model_dir, tmp_path_factory.mktemp("iq3-synthetic"), kv_heads=4, seed=23)


@pytest.fixture(scope="module")
def real_cut(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model's first layer with its widths cut to multiples of 256: hidden 576 -> 512 (8 of the 9
    query heads, 2 of the 3 KV heads), ffn 1536; the first 4096 embedding rows, also as an untied head."""
    folder = ModelFolder(model_dir)
    hidden, kv = 512, 128
    cut = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
           "gate_proj": (1536, hidden), "up_proj": (1536, hidden), "down_proj": (hidden, 1536)}
    keep = {}
    for n in folder.names():
        if n.startswith("model.layers.") and int(n.split(".")[2]) >= 1:
            continue
        w = folder.get(n).float().numpy()
        short = n.split(".")[-2]
        keep[n] = w[:cut[short][0], :cut[short][1]] if short in cut else w[..., :hidden]
    keep["model.embed_tokens.weight"] = keep["model.embed_tokens.weight"][:VOCAB]
    keep["lm_head.weight"] = keep["model.embed_tokens.weight"].copy()
    config = {**json.loads((model_dir / "config.json").read_text()), "num_hidden_layers": 1, "hidden_size": hidden,
              "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "tie_word_embeddings": False}
    return _save_folder(tmp_path_factory.mktemp("iq3-real-cut") / "real-cut-1-layer", config, keep)


@pytest.fixture(scope="module")
def real_layer(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model's first layer, final norm and first 4096 embedding rows (tied head)."""
    return real_first_layer(model_dir, tmp_path_factory.mktemp("iq3-real"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    """(model folder, with imatrix) -> (lowbit's IQ3_XXS GGUF, llama.cpp's, seconds each), the same imatrix (or
    none) for both, built on first use."""
    from lowbit.peers.llamacpp import llamacpp_quantize

    root = tmp_path_factory.mktemp("iq3-files")
    f32: dict[Path, Path] = {}
    made: dict[tuple, tuple[Path, Path, float, float]] = {}

    def get(folder: Path, with_imatrix: bool = True):
        key = (folder, with_imatrix)
        if key not in made:
            tag = f"{folder.name}-{int(with_imatrix)}"
            if folder not in f32:
                f32[folder] = _f32_gguf(folder, root / f"{folder.name}-f32.gguf")
            imat = _imatrix(folder, 5) if with_imatrix else None
            ours = root / f"lowbit-{tag}.gguf"
            t0 = time.perf_counter()
            quantize_to_gguf(folder, GGUFConfig("IQ3_XXS", "rtn"), ours, imatrix=imat, vocab=_toy_vocab())
            t1 = time.perf_counter()
            theirs = llamacpp_quantize(f32[folder], root / f"llamacpp-{tag}.gguf", "IQ3_XXS", imat)
            made[key] = ours, theirs, t1 - t0, time.perf_counter() - t1
        return made[key]

    get.f32 = f32
    return get


@pytest.fixture(scope="module")
def text_ids(model_dir: Path, eval_text: Path) -> list[int]:
    """128 tokens of real text folded into the 4096-token vocabulary."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(eval_text.read_text()[:4000]).ids
    assert len(ids) >= 128
    return [i % VOCAB for i in ids[:128]]


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in open_gguf(path).tensors}


def _layer_types(types: dict[str, str], layers: int) -> dict[str, set[str]]:
    return {short: {types[f"blk.{i}.{short}.weight"] for i in range(layers)} for short in LINEARS.values()}


def test_synthetic_256_mix_equals_llamacpp(synthetic256: Path, pair) -> None:
    """Every tensor of lowbit's IQ3_XXS file has llama.cpp's type and llama.cpp's bytes (256-multiple widths,
    corner-case weights, attn_v IQ3_XXS at n_gqa 2)."""
    ours, theirs, t_ours, t_theirs = pair(synthetic256)
    counts = _compare(ours, theirs)
    _check(counts, "synthetic-256 IQ3_XXS imatrix")
    print(f"IQ3_XXS synthetic: lowbit {t_ours:.1f} s, llama.cpp {t_theirs:.1f} s")
    types = _types(ours)
    assert set(counts) == {"IQ3_XXS", "IQ3_S", "IQ2_S", "Q5_K", "F32"}
    assert types["output.weight"] == "Q5_K" and types["token_embd.weight"] == "IQ3_S"
    assert _layer_types(types, 8) == {k: {v} for k, v in {**MIX_256, "attn_v": "IQ3_XXS"}.items()}
    assert int(open_gguf(ours).fields["general.file_type"].contents()) == 23


def test_real_cut_mix_equals_llamacpp_and_runs(real_cut: Path, pair, text_ids: list[int]) -> None:
    """Real weights at 256-multiple widths: llama.cpp's types and bytes (attn_v Q4_K at n_gqa 4), and llama.cpp's
    logits on lowbit's file match lowbit's forward on its dequantization (IQ3_XXS, IQ3_S, IQ2_S kernels)."""
    ours, theirs, t_ours, t_theirs = pair(real_cut)
    counts = _compare(ours, theirs)
    _check(counts, "real-cut IQ3_XXS imatrix")
    print(f"IQ3_XXS real-cut: lowbit {t_ours:.1f} s, llama.cpp {t_theirs:.1f} s")
    types = _types(ours)
    assert set(counts) == {"IQ3_XXS", "IQ3_S", "IQ2_S", "Q4_K", "Q5_K", "F32"}
    assert _layer_types(types, 1) == {k: {v} for k, v in {**MIX_256, "attn_v": "Q4_K"}.items()}
    kld, top1 = llamacpp_vs_lowbit(ours, text_ids)
    print(f"IQ3_XXS real-cut file: llama.cpp vs lowbit forward KLD {kld:.2e}, top-1 {top1:.3f}")
    assert kld < 2e-3 and top1 > 0.95


@pytest.mark.parametrize("with_imatrix", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["imatrix", "no-imatrix"])
def test_real_layer_fallback_mix_equals_llamacpp(real_layer: Path, pair, with_imatrix: bool) -> None:
    """The real model's IQ3_XXS fallback mix on real weights, byte for byte: 576-wide rows in IQ4_NL, the tied
    head in Q8_0, ffn_down (1536 wide) in IQ3_XXS with the imatrix, Q3_K without one (n_layer/8 = 0)."""
    ours, theirs, t_ours, t_theirs = pair(real_layer, with_imatrix)
    counts = _compare(ours, theirs)
    _check(counts, f"real 1-layer IQ3_XXS {'imatrix' if with_imatrix else 'no imatrix'}")
    print(f"IQ3_XXS real layer: lowbit {t_ours:.1f} s, llama.cpp {t_theirs:.1f} s")
    down = "IQ3_XXS" if with_imatrix else "Q3_K"
    assert set(counts) == {down, "IQ4_NL", "Q8_0", "F32"}
    assert _types(ours)["blk.0.ffn_down.weight"] == down and _types(ours)["token_embd.weight"] == "Q8_0"


def test_no_imatrix_is_refused_where_llamacpp_refuses(synthetic256: Path, pair, tmp_path: Path) -> None:
    """The 256-wide mix has IQ2_S / IQ3_XXS tensors: without an imatrix llama.cpp refuses it, and lowbit does at
    plan time, in one line naming --imatrix, writing nothing."""
    from lowbit.peers.llamacpp import llamacpp_quantize

    pair(synthetic256)  # the F32 file
    with pytest.raises(LowbitError, match="could not quantize"):
        llamacpp_quantize(pair.f32[synthetic256], tmp_path / "llamacpp.gguf", "IQ3_XXS")
    out = tmp_path / "lowbit.gguf"
    with pytest.raises(LowbitError, match="--imatrix") as e:
        quantize_to_gguf(synthetic256, GGUFConfig("IQ3_XXS"), out, vocab=_toy_vocab())
    assert "\n" not in str(e.value) and "IQ2_S" in str(e.value) and "IQ3_XXS" in str(e.value)
    assert not out.exists()


def test_mix_rules_and_full_model_plan(model_dir: Path) -> None:
    """llama.cpp's IQ3_XXS rules: on SmolLM2's 30 layers (n_gqa 3, tied, 576 / 1536 wide) every 576-wide tensor
    falls back to IQ4_NL and the tied embedding to Q8_0; ffn_down is IQ3_XXS with an imatrix, and without one
    Q4_K in the first 30/8 = 3 layers and Q3_K after, which needs no imatrix (check_plan lets it through, as
    llama.cpp does). On 256-wide tensors attn_v is Q4_K at n_gqa >= 4, and IQ3_S without an imatrix."""
    folder = ModelFolder(model_dir)
    for with_imatrix, downs in ((True, ["IQ3_XXS"] * 30), (False, ["Q4_K"] * 3 + ["Q3_K"] * 27)):
        types = plan_types(folder, GGUFConfig("IQ3_XXS"), has_imatrix=with_imatrix)
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        assert counts == {"IQ4_NL": 180, "Q8_0": 1, "F32": 61, **{d: downs.count(d) for d in set(downs)}}
        assert [types[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(30)] == downs
    assert check_plan(folder, GGUFConfig("IQ3_XXS"), None)
    infos = [TensorInfo(f"blk.0.{s}.weight", 256) for s in ("attn_q", "attn_k", "attn_v", "attn_output")]
    assert choose_types(infos, "IQ3_XXS", 1, 4, True)["blk.0.attn_v.weight"] == "Q4_K"
    assert choose_types(infos, "IQ3_XXS", 1, 2, False) == {
        "blk.0.attn_q.weight": "IQ2_S", "blk.0.attn_k.weight": "IQ2_S", "blk.0.attn_v.weight": "IQ3_S",
        "blk.0.attn_output.weight": "IQ3_S"}


@pytest.mark.slow  # ~2 min on 2 cores: both quantizers over the whole 30-layer model
def test_whole_real_model_iq3_xxs_equals_llamacpp(model_dir: Path, tmp_path: Path) -> None:
    """The whole real model (its own vocabulary), IQ3_XXS with a random imatrix on every decoder linear:
    llama.cpp's types and bytes, tensor for tensor."""
    from lowbit.formats.gguf import hf_folder_to_gguf
    from lowbit.peers.llamacpp import llamacpp_quantize

    imat = _imatrix(model_dir, 7)
    ours = tmp_path / "lowbit.gguf"
    quantize_to_gguf(model_dir, GGUFConfig("IQ3_XXS"), ours, imatrix=imat)
    f32 = hf_folder_to_gguf(model_dir, tmp_path / "f32.gguf")
    theirs = llamacpp_quantize(f32, tmp_path / "llamacpp.gguf", "IQ3_XXS", imat)
    f32.unlink()
    _check(_compare(ours, theirs), "real 30-layer IQ3_XXS imatrix")
    assert [_types(ours)[f"blk.{i}.ffn_down.weight"] for i in range(30)] == ["IQ3_XXS"] * 30
