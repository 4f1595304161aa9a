"""Everything lowbit knows about each architecture lives in this one table.

A Llama-family decoder is the same graph under different names: the table maps
each model_type to its tensor names and its few structural switches (q/k/v
biases, per-head q/k norms, llama.cpp's architecture name and rotary layout),
so loaders, quantizers and exporters never special-case a model by name.

Every tensor a decoder layer owns is listed once, as a LayerTensor with its
short name (the key in a layer's weight dict), its HF name and its llama.cpp
name. Whatever a checkpoint holds beyond these is refused when it is opened
(see ModelFolder): a writer can then carry every tensor it was given, and
nothing is ever dropped silently.
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

# llama.cpp's name (inside "blk.{i}.") of each short name.
GGUF_BLOCK_NAMES: dict[str, str] = {
    "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
    "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm",
    "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
}
QK_NORMS: tuple[tuple[str, str], ...] = (("q_norm", "self_attn.q_norm"), ("k_norm", "self_attn.k_norm"))
HF_SUFFIX: dict[str, str] = dict(LINEARS + NORMS + QK_NORMS)

# Tensors some checkpoints carry that hold no information lowbit needs (recomputed from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class LayerTensor:
    """One tensor of a decoder layer: `short` is its key in a layer's weight dict ('q', 'q_bias', ...)."""

    short: str
    hf_suffix: str  # relative to "model.layers.{i}.", e.g. "self_attn.q_proj.bias"
    gguf_suffix: str  # relative to "blk.{i}.", e.g. "attn_q.bias"

    @property
    def is_linear(self) -> bool:
        return self.short in dict(LINEARS)


def _tensor(short: str, kind: str = "weight") -> LayerTensor:
    base = short.removesuffix("_bias")
    return LayerTensor(short, f"{HF_SUFFIX[base]}.{kind}", f"{GGUF_BLOCK_NAMES[base]}.{kind}")


@dataclass(frozen=True)
class Arch:
    """Structural switches of one model_type; names follow the HF Llama layout."""

    model_type: str
    hf_class: str
    gguf_arch: str  # llama.cpp's general.architecture
    qkv_bias: bool = False  # q_proj/k_proj/v_proj carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before the rotary embedding (Qwen3)
    # llama.cpp's "llama" graph applies the rotary embedding to interleaved pairs, so its converter
    # permutes q/k rows; qwen2/qwen3 use the NeoX (rotate-half) layout of HF and are stored as they are.
    permute_qk: bool = True
    layer_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"

    def layer_tensors(self) -> tuple[LayerTensor, ...]:
        """Every tensor of one decoder layer, in the order lowbit writes them (norms, attention, MLP)."""
        out = [_tensor("attn_norm")]
        for short in ("q", "k", "v"):
            out.append(_tensor(short))
            if self.qkv_bias:
                out.append(_tensor(f"{short}_bias", "bias"))
        if self.qk_norm:
            out += [_tensor("q_norm"), _tensor("k_norm")]
        out += [_tensor(s) for s in ("o", "ffn_norm", "gate", "up", "down")]
        return tuple(out)

    def plain_layer_tensors(self) -> tuple[LayerTensor, ...]:
        """The layer tensors no method quantizes (norms, biases), carried as they are."""
        return tuple(t for t in self.layer_tensors() if not t.is_linear)


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "LlamaForCausalLM", "llama"),
    "mistral": Arch("mistral", "MistralForCausalLM", "llama"),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM", "qwen2", qkv_bias=True, permute_qk=False),
    "qwen3": Arch("qwen3", "Qwen3ForCausalLM", "qwen3", qk_norm=True, permute_qk=False),
}


# --trust-remote-code: set for one command by the CLI (lowbit.cli), or by an API user
_TRUST_REMOTE_CODE = [False]


def trust_remote_code(on: bool) -> None:
    """Let configs that name custom modelling code (auto_map) through. lowbit still never imports or runs
    that code: its own forward reads the tensors by the arch table whatever the config names."""
    _TRUST_REMOTE_CODE[0] = bool(on)


def check_remote_code(config: dict, where: str) -> None:
    """Refuse a config.json whose auto_map names custom modelling code, unless --trust-remote-code.

    Such a folder is written for code lowbit would have to trust blindly (transformers imports it with
    trust_remote_code=True); it is refused with one line naming the file and the fix."""
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if auto_map and not _TRUST_REMOTE_CODE[0]:
        names = ", ".join(sorted(map(str, auto_map))) if isinstance(auto_map, dict) else str(auto_map)[:80]
        raise LowbitError(
            f"{where}: auto_map names custom modelling code (for {names}); lowbit never runs it and reads only the "
            "tensors of its own Llama-family layout; pass --trust-remote-code to proceed without that code, or "
            "remove auto_map from config.json")


def arch_for(model_type: str | None, where: str) -> Arch:
    """Look up a model_type, failing with the list of supported ones."""
    if model_type not in ARCHS:
        supported = ", ".join(sorted(ARCHS))
        raise LowbitError(
            f"{where}: model_type {model_type!r} is not a supported Llama-family "
            f"architecture (supported: {supported})"
        )
    return ARCHS[model_type]


def arch_for_gguf(gguf_arch: str | None, where: str) -> Arch:
    """The arch a GGUF's general.architecture stands for (llama covers Llama and Mistral)."""
    for arch in ARCHS.values():
        if arch.gguf_arch == gguf_arch:
            return arch
    names = ", ".join(sorted({a.gguf_arch for a in ARCHS.values()}))
    raise LowbitError(f"{where}: GGUF architecture {gguf_arch!r} is not one lowbit imports ({names})")


def layer_tensor_name(arch: Arch, layer: int, suffix: str, kind: str = "weight") -> str:
    return f"{arch.layer_prefix}.{layer}.{suffix}.{kind}"


def layer_name(arch: Arch, layer: int, t: LayerTensor) -> str:
    return f"{arch.layer_prefix}.{layer}.{t.hf_suffix}"
