"""A layer-at-a-time Llama forward pass over many sequences at once.

Running every sequence through layer i before touching layer i+1 means only one
layer's weights are ever in memory, which is what lets lowbit evaluate and
calibrate models larger than RAM, and what GPTQ/AWQ's sequential pipeline needs
(the inputs of layer i+1 are the outputs of the *quantized* layer i).

The math is the standard Llama block: RMSNorm, rotary attention with grouped
KV heads, SwiGLU MLP; it is checked against transformers and llama.cpp in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.model.arch import layer_name
from lowbit.model.hf import ModelFolder, ModelSpec
from lowbit.runtime import placement


class WeightSource(Protocol):
    """Anything that can hand out a model's weights layer by layer (FP folder, quantized checkpoint)."""

    spec: ModelSpec
    config: dict

    def layer(self, i: int) -> dict[str, torch.Tensor]: ...
    def embedding(self) -> torch.Tensor: ...
    def final_norm(self) -> torch.Tensor: ...
    def lm_head(self) -> torch.Tensor: ...


def layer_weights(get: Callable[[str], torch.Tensor], spec: ModelSpec, i: int) -> dict[str, torch.Tensor]:
    """Layer i's tensors under short names (q, k, ..., attn_norm, q_bias, q_norm), fetched by full HF name."""
    arch = spec.arch
    return {t.short: get(layer_name(arch, i, t)) for t in arch.layer_tensors()}


class StoredWeights:
    """WeightSource for a reader of quantized files: it provides `spec`, `store` (a TensorStore) and
    `tensor(name)` (any weight as float32, dequantized if it was quantized); this adds the rest."""

    spec: ModelSpec

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        return layer_weights(self.tensor, self.spec, i)

    def embedding(self) -> torch.Tensor:
        return self.tensor(self.spec.arch.embed)

    def final_norm(self) -> torch.Tensor:
        return self.tensor(self.spec.arch.final_norm)

    def lm_head(self) -> torch.Tensor:
        arch = self.spec.arch
        return self.tensor(arch.embed if self.spec.tie_word_embeddings else arch.lm_head)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.store.files.values()))  # type: ignore[attr-defined]


class FolderWeights:
    """WeightSource over a HF folder, keyed by short names (q, k, ..., attn_norm, q_bias)."""

    def __init__(self, folder: ModelFolder):
        self.folder = folder
        self.spec = folder.spec
        self.config = folder.config

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        return layer_weights(self.folder.get, self.spec, i)

    def embedding(self) -> torch.Tensor:
        return self.folder.get(self.spec.arch.embed)

    def final_norm(self) -> torch.Tensor:
        return self.folder.get(self.spec.arch.final_norm)

    def lm_head(self) -> torch.Tensor:
        return self.folder.get(self.folder.lm_head_name())


@dataclass
class Rope:
    cos: torch.Tensor  # [T, head_dim]
    sin: torch.Tensor


def build_rope(config: dict, spec: ModelSpec, seq_len: int) -> Rope:
    """cos/sin tables for positions 0..seq_len-1, honouring the config's rope scaling type.

    A rope scaling that cannot be set up, or that rotates another number of frequencies than the
    heads have, is a one-line error naming config.json's field rather than a failure in the forward."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise LowbitError(f"config.json: rope_scaling is {str(params)[:60]!r}, not an object; fix config.json")
    rope_type = params.get("rope_type", params.get("type", "default"))
    try:
        theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    except (TypeError, ValueError):
        raise LowbitError("config.json: rope_theta is not a number; fix config.json") from None
    scaling = 1.0
    if rope_type in (None, "default"):
        inv_freq = 1.0 / (theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim))
    else:
        inv_freq, scaling = _hf_rope(config, rope_type)
    if inv_freq.numel() != spec.head_dim // 2:
        raise LowbitError(f"config.json: rope scaling {str(rope_type)[:40]!r} rotates {inv_freq.numel()} frequencies, "
                          f"but heads of {spec.head_dim} need {spec.head_dim // 2}; fix config.json")
    pos = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return Rope(emb.cos() * scaling, emb.sin() * scaling)


def _hf_rope(config: dict, rope_type: str) -> tuple[torch.Tensor, float]:
    """Scaled rope variants (llama3, linear, yarn, ...) follow transformers' own definitions, whose
    checks of the config raise many exception types; each becomes one line naming rope scaling."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    try:
        hf_cfg = AutoConfig.for_model(**config)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, torch.device("cpu"))
        return inv_freq.float().reshape(-1), float(scaling)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise LowbitError(f"config.json: rope scaling {str(rope_type)[:40]!r} cannot be set up ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:120]}); fix rope_scaling in config.json") from None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + eps) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    t = x.shape[-2]
    return x * rope.cos[:t] + _rotate_half(x) * rope.sin[:t]


# Optional entry of a layer's weights: {short: fn(x) -> x} applied to that linear's input. A runtime that
# rounds activations before its matmuls (llama.cpp's Q8_0 / Q8_K dot products) is reproduced this way.
ACT_QUANT = "act_quant"


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], short: str) -> torch.Tensor:
    act_quant = w.get(ACT_QUANT)
    if act_quant and short in act_quant:
        x = act_quant[short](x)
    return F.linear(x, w[short], w.get(f"{short}_bias"))


def attention_context(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, rope: Rope) -> torch.Tensor:
    """The attention context [B, T, heads*head_dim] that feeds o_proj, for normalised input x."""
    b, t, _ = x.shape
    hd = spec.head_dim
    q = linear(x, w, "q").view(b, t, spec.num_heads, hd)
    k = linear(x, w, "k").view(b, t, spec.num_kv_heads, hd)
    if "q_norm" in w:  # Qwen3: each head's q and k are RMS-normalised before the rotation
        q, k = rms_norm(q, w["q_norm"], spec.rms_norm_eps), rms_norm(k, w["k_norm"], spec.rms_norm_eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = linear(x, w, "v").view(b, t, spec.num_kv_heads, hd).transpose(1, 2)
    q, k = _apply_rope(q, rope), _apply_rope(k, rope)
    rep = spec.num_heads // spec.num_kv_heads
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return att.transpose(1, 2).reshape(b, t, spec.num_heads * hd)


Hook = Callable[[str, torch.Tensor], None]


def decoder_layer(x: torch.Tensor, w: dict[str, torch.Tensor], spec: ModelSpec, rope: Rope,
                  hook: Hook | None = None) -> torch.Tensor:
    """One decoder block. `hook(short_name, input)` sees the input of every linear (for calibration)."""
    eps = spec.rms_norm_eps
    h = rms_norm(x, w["attn_norm"], eps)
    ctx = attention_context(h, w, spec, rope)
    x = x + linear(ctx, w, "o")
    h2 = rms_norm(x, w["ffn_norm"], eps)
    act = F.silu(linear(h2, w, "gate")) * linear(h2, w, "up")
    if hook:
        for short, inp in (("q", h), ("k", h), ("v", h), ("o", ctx), ("gate", h2), ("up", h2), ("down", act)):
            hook(short, inp)
    return x + linear(act, w, "down")


def batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def run_layers(source: WeightSource, tokens: torch.Tensor, batch: int = 8,
               on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
    """Final-normed hidden states [N, T, H] for token windows [N, T], one layer in memory at a time."""
    spec = source.spec
    where = placement()
    rope = where.rope(build_rope(source.config, spec, tokens.shape[1]))
    x = where.activations(F.embedding(tokens, source.embedding()))
    for i in range(spec.num_layers):
        w = where.weights(source.layer(i))
        for sl in batches(x.shape[0], batch):
            x[sl] = where.home(decoder_layer(where.compute(x[sl]), w, spec, rope), x)
        del w
        if on_layer:
            on_layer(i)
    return rms_norm(x, source.final_norm().to(x.device), spec.rms_norm_eps)


@torch.inference_mode()
def run_layers_ragged(source: WeightSource, buckets: list[torch.Tensor], batch: int = 32,
                      on_layer: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """run_layers over several token matrices of different lengths ([n_b, T_b] each), every bucket
    through layer i before layer i+1, so each layer's weights are read (and dequantized) once.

    Multiple-choice scoring has thousands of short sequences of varied length: bucketing them by
    length avoids padding everything to the longest, and right padding inside a bucket is harmless
    to a causal model for the positions that are scored."""
    spec = source.spec
    where = placement()
    rope = where.rope(build_rope(source.config, spec, max(b.shape[1] for b in buckets)))
    emb = source.embedding()
    xs = [where.activations(F.embedding(b, emb)) for b in buckets]
    del emb
    for i in range(spec.num_layers):
        w = where.weights(source.layer(i))
        for x in xs:
            for sl in batches(x.shape[0], batch):
                x[sl] = where.home(decoder_layer(where.compute(x[sl]), w, spec, rope), x)
        del w
        if on_layer:
            on_layer(i)
    norm = source.final_norm()
    return [rms_norm(x.cpu(), norm, spec.rms_norm_eps) for x in xs]


@torch.inference_mode()
def iter_logits(source: WeightSource, tokens: torch.Tensor, batch: int = 8,
                on_layer: Callable[[int], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (window index, float32 logits [T, V]) one window at a time to bound memory."""
    where = placement()
    hidden = run_layers(source, tokens, batch, on_layer)
    head = source.lm_head().to(where.device)
    head_act = getattr(source, "head_act_quant", None)
    for n in range(hidden.shape[0]):
        h = where.compute(hidden[n] if head_act is None else head_act(hidden[n]))
        yield n, (h @ head.T).cpu()
