"""llama.cpp's 70B rule in lowbit's GGUF mixes: on a model llama.cpp calls LLM_TYPE_70B, an attn_v that its file
type's rules left at Q3_K or Q4_K becomes Q5_K (llama_tensor_get_type, the last rule of the attn_v branch; the
IQ2_XXS / IQ2_XS / IQ2_S / IQ2_M low-bit branch never reaches it).

llama.cpp's model type comes from each architecture's load_hparams: "llama" (Llama; Mistral is written as llama)
with 80 layers is 70B when n_head != n_head_kv and 65B when they are equal, "qwen2" with 80 layers is 70B, "qwen3"
has no 70B case.

The judges:
  * Llama shapes of 80 layers (a 70B-like GQA model at real widths, a 65B-like one with n_head == n_head_kv, a
    GQA one at n_gqa 2 with a tied head, and one whose 160-wide rows take every fallback), every file type lowbit
    writes: lowbit's plan is llama.cpp's own type selection (llama_quant_compute_types on shape-only tensors,
    through test_gguf_iq_mixes's fixture). Its model comes from llama_quant_model_from_metadata, which sets
    LLM_TYPE_70B for the "llama" architecture only (80 layers, n_head != n_head_kv), so it cannot judge qwen2;
  * Qwen2 (and a Qwen3 control) of 80 layers: tiny synthetic models (256 wide) quantized by llama_model_quantize,
    whose loader runs the architecture's own load_hparams; every tensor type of llama.cpp's file is lowbit's
    plan. A Llama of 80 layers is quantized the same way once, so the two llama.cpp paths are seen to agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_gguf_iq_mixes import _ours, _shapes, llamacpp_types  # noqa: F401  (llamacpp_types: a fixture)
from test_gguf_iquants import _f32_gguf, _save_folder

from lowbit.formats.gguf import hf_name_to_gguf, open_gguf
from lowbit.model.arch import ARCHS
from lowbit.model.hf import ModelFolder, expected_tensor_shapes, spec_from_config
from lowbit.quant.gguf_mix import FILE_TYPES, TensorInfo, choose_types, llamacpp_is_70b, quantizable
from lowbit.quant.gguf_pipeline import GGUFConfig, plan_types, plan_types_for

llama_cpp = pytest.importorskip("llama_cpp")

WRITTEN = [ft for ft in FILE_TYPES if ft not in ("F32", "F16")]
# The file types whose attn_v the rule reaches at n_gqa >= 4 (some of their tensors are Q3_K / Q4_K before it).
REACHED = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M")

SHAPES_80 = {  # (hidden, ffn, layers, heads, kv heads, head_dim, tied, 70B for llama.cpp)
    "70b-gqa8-untied": (8192, 28672, 80, 64, 8, 128, False, True),  # Llama 2 / 3 70B
    "65b-mha-untied": (8192, 22016, 80, 64, 64, 128, False, False),  # LLaMA-1 65B: the control
    "512x1536-gqa2-tied": (512, 1536, 80, 8, 4, 64, True, True),  # n_gqa 2: the IQ3 rules leave IQ3_S
    "160x512-gqa4-tied": (160, 512, 80, 8, 2, 20, True, True),  # 32- but not 256-multiple rows: Q5_K -> Q5_1
}


@pytest.mark.parametrize("shape", SHAPES_80)
@pytest.mark.parametrize("file_type", WRITTEN)
def test_80_layer_llama_plan_equals_llamacpp(llamacpp_types, file_type: str, shape: str) -> None:  # noqa: F811
    """Every file type on 80-layer Llama shapes: lowbit's plan (is_70b as llamacpp_is_70b says) is llama.cpp's."""
    hidden, ffn, layers, heads, kv, head_dim, tied, big = SHAPES_80[shape]
    assert llamacpp_is_70b("llama", layers, heads, kv) is big
    tensors = _shapes(hidden, ffn, layers, heads, kv, head_dim, tied)
    theirs = llamacpp_types(tensors, file_type, layers, heads, kv, hidden, ffn, head_dim)
    ours = choose_types([TensorInfo(n, ne0) for n, ne0, _ in tensors], file_type, layers, heads // kv, False,
                        is_70b=big)
    assert {n: t for n, t in ours.items() if quantizable(TensorInfo(n, 0))} == theirs
    if big and file_type in REACHED and heads // kv >= 4:  # the rule shows on this shape: without it, no match
        assert _ours(tensors, file_type, layers, heads // kv, False) != theirs


def _attn_v(n: int) -> list[str]:
    return [f"blk.{i}.attn_v.weight" for i in range(n)]


def test_q4_k_m_70b_changes_exactly_attn_v_q4_k() -> None:
    """Q4_K_M on the 70B shape: the rule turns the 40 attn_v that Q4_K_M leaves at Q4_K (those outside
    use_more_bits) into Q5_K, keeps the 40 Q6_K ones, and changes nothing else; on the 65B control (the same
    80 layers, n_head == n_head_kv) the plan is the one without the rule."""
    infos = [TensorInfo(n, ne0) for n, ne0, _ in _shapes(8192, 28672, 80, 64, 8, 128, False)]
    base = choose_types(infos, "Q4_K_M", 80, 8)
    big = choose_types(infos, "Q4_K_M", 80, 8, is_70b=True)
    changed = sorted(n for n in base if base[n] != big[n])
    more = [i for i in range(80) if i < 10 or i >= 70 or (i - 10) % 3 == 2]
    assert len(more) == 40
    assert changed == sorted(f"blk.{i}.attn_v.weight" for i in range(80) if i not in more)
    assert all(base[n] == "Q4_K" and big[n] == "Q5_K" for n in changed)
    assert [big[n] for n in _attn_v(80)] == ["Q6_K" if i in more else "Q5_K" for i in range(80)]
    # The 65B control, as the pipeline decides it from a config: no 70B, so no change.
    mha = [TensorInfo(n, ne0) for n, ne0, _ in _shapes(8192, 22016, 80, 64, 64, 128, False)]
    assert not llamacpp_is_70b("llama", 80, 64, 64)
    assert choose_types(mha, "Q4_K_M", 80, 1, is_70b=llamacpp_is_70b("llama", 80, 64, 64)) == choose_types(
        mha, "Q4_K_M", 80, 1)
    # The low-bit branch and the types that never leave attn_v at Q3_K / Q4_K: no change on the 70B shape.
    for ft in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q3_K_L", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS"):
        assert choose_types(infos, ft, 80, 8, True, is_70b=True) == choose_types(infos, ft, 80, 8, True), ft


def test_model_type_table() -> None:
    """llama.cpp's load_hparams: llama 80 layers GQA -> 70B, MHA -> 65B; qwen2 80 layers -> 70B; qwen3 never;
    other layer counts never. Mistral is written as llama."""
    assert ARCHS["mistral"].gguf_arch == "llama"
    assert llamacpp_is_70b("llama", 80, 64, 8) and not llamacpp_is_70b("llama", 80, 64, 64)
    assert not llamacpp_is_70b("llama", 79, 64, 8) and not llamacpp_is_70b("llama", 126, 128, 8)
    assert llamacpp_is_70b("qwen2", 80, 64, 8) and llamacpp_is_70b("qwen2", 80, 64, 64)
    assert not llamacpp_is_70b("qwen2", 64, 40, 8)
    assert not llamacpp_is_70b("qwen3", 80, 64, 8)


def _config(model_type: str, layers: int, heads: int, kv: int, hidden: int = 8192, ffn: int = 28672) -> dict:
    return {"architectures": [ARCHS[model_type].hf_class], "model_type": model_type, "vocab_size": 4096,
            "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hidden // heads,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0,
            "tie_word_embeddings": False}


@pytest.mark.parametrize("model_type,kv,big", [("llama", 8, True), ("llama", 64, False), ("mistral", 8, True),
                                               ("qwen2", 8, True), ("qwen2", 64, True), ("qwen3", 8, False)])
def test_pipeline_plan_threads_the_model_type(tmp_path: Path, model_type: str, kv: int, big: bool) -> None:
    """plan_types_for (the pipeline's and the memory planner's plan, from a config alone) decides the 70B rule
    from the arch, the layer count and the head counts."""
    spec = spec_from_config(_config(model_type, 80, 64, kv), ARCHS[model_type], tmp_path)
    shapes = expected_tensor_shapes(spec)
    plan = {hf_name_to_gguf(n): t for n, t in plan_types_for(spec, shapes.__getitem__, GGUFConfig("Q4_K_M"),
                                                             False).items()}
    assert plan["blk.11.attn_v.weight"] == ("Q5_K" if big else "Q4_K")  # 11: not a use_more_bits layer
    assert plan["blk.12.attn_v.weight"] == "Q6_K"
    assert plan["blk.11.attn_q.weight"] == "Q4_K"


# ---------------------------------------------------------------------------- llama_model_quantize


def _synthetic_80(root: Path, model_type: str) -> Path:
    """80 layers, hidden and ffn 256, 8 query heads of 32 and 2 kv heads (n_gqa 4), untied head; small random
    weights (the type plan does not read them)."""
    cfg = _config(model_type, 80, 8, 2, hidden=256, ffn=256)
    rng = np.random.default_rng(80)
    hidden, kv = 256, 64
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (256, hidden), "mlp.up_proj": (256, hidden), "mlp.down_proj": (hidden, 256)}
    block = {s: (rng.standard_normal(shape) * 0.02).astype(np.float32) for s, shape in shapes.items()}
    tensors = {"model.embed_tokens.weight": rng.standard_normal((4096, hidden)) * 0.02,
               "lm_head.weight": rng.standard_normal((4096, hidden)) * 0.02, "model.norm.weight": np.ones(hidden)}
    for i in range(80):
        for short, w in block.items():
            tensors[f"model.layers.{i}.{short}.weight"] = w
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = np.ones(hidden)
        if model_type == "qwen2":
            for short, n in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
                tensors[f"model.layers.{i}.self_attn.{short}.bias"] = np.zeros(n)
        if model_type == "qwen3":
            for short in ("q_norm", "k_norm"):
                tensors[f"model.layers.{i}.self_attn.{short}.weight"] = np.ones(32)
    out = _save_folder(root / f"{model_type}-80", cfg, tensors)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 80
    return out


@pytest.fixture(scope="module")
def quantized_80(tmp_path_factory: pytest.TempPathFactory):
    """(model type, file type) -> (lowbit's plan by GGUF name, llama.cpp's file's types), the F32 GGUF built once
    per model type."""
    from lowbit.peers.llamacpp import llamacpp_quantize

    root = tmp_path_factory.mktemp("mix-70b")
    f32: dict[str, tuple[Path, Path]] = {}

    def get(model_type: str, file_type: str):
        if model_type not in f32:
            folder = _synthetic_80(root, model_type)
            f32[model_type] = folder, _f32_gguf(folder, root / f"{model_type}-f32.gguf")
        folder, src = f32[model_type]
        dst = llamacpp_quantize(src, root / f"{model_type}-{file_type}.gguf", file_type)
        theirs = {t.name: t.tensor_type.name for t in open_gguf(dst).tensors}
        dst.unlink()
        ours = {hf_name_to_gguf(n): t for n, t in plan_types(ModelFolder(folder), GGUFConfig(file_type), False).items()}
        return ours, theirs

    return get


@pytest.mark.parametrize("model_type,file_type,big", [
    ("qwen2", "Q4_K_M", True), ("qwen2", "Q3_K_S", True), ("qwen3", "Q4_K_M", False), ("llama", "Q4_K_M", True)])
def test_80_layer_file_types_equal_llamacpp_quantize(quantized_80, model_type: str, file_type: str,
                                                     big: bool) -> None:
    """llama_model_quantize on an 80-layer 256-wide model, whose loader decides the model type by the arch's
    load_hparams: every tensor of its file has lowbit's planned type; attn_v shows the 70B rule on qwen2 and llama
    and not on qwen3."""
    ours, theirs = quantized_80(model_type, file_type)
    assert ours == theirs
    low = "Q4_K" if file_type == "Q4_K_M" else "Q3_K"
    assert theirs["blk.11.attn_v.weight"] == ("Q5_K" if big else low)
    assert theirs["blk.11.attn_q.weight"] == low
