"""Everything lowbit knows about each architecture lives in this one table.

A Llama-family decoder is the same graph under different names: the table maps
each model_type to its tensor names and its few structural switches (biases),
so loaders, quantizers and exporters never special-case a model by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError

# The seven linear layers of a decoder block, in execution order, as
# (short name, HF suffix relative to "model.layers.{i}.").
LINEARS: tuple[tuple[str, str], ...] = (
    ("q", "self_attn.q_proj"),
    ("k", "self_attn.k_proj"),
    ("v", "self_attn.v_proj"),
    ("o", "self_attn.o_proj"),
    ("gate", "mlp.gate_proj"),
    ("up", "mlp.up_proj"),
    ("down", "mlp.down_proj"),
)

NORMS: tuple[tuple[str, str], ...] = (
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
)


@dataclass(frozen=True)
class Arch:
    """Structural switches of one model_type; names follow the HF Llama layout."""

    model_type: str
    hf_class: str
    qkv_bias: bool = False
    layer_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "LlamaForCausalLM"),
    "mistral": Arch("mistral", "MistralForCausalLM"),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM", qkv_bias=True),
}


def arch_for(model_type: str | None, where: str) -> Arch:
    """Look up a model_type, failing with the list of supported ones."""
    if model_type not in ARCHS:
        supported = ", ".join(sorted(ARCHS))
        raise LowbitError(
            f"{where}: model_type {model_type!r} is not a supported Llama-family "
            f"architecture (supported: {supported})"
        )
    return ARCHS[model_type]


def layer_tensor_name(arch: Arch, layer: int, suffix: str, kind: str = "weight") -> str:
    return f"{arch.layer_prefix}.{layer}.{suffix}.{kind}"
