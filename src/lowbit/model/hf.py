"""Read a Hugging Face model folder lazily, one tensor at a time.

Nothing is loaded up front except the safetensors headers, so a quantizer can
walk a model far larger than RAM layer by layer. Every header is checked
against its file size before use: a truncated download fails here with the
file's name, not later with a cryptic deserialisation error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats.safetensors_io import TensorStore
from lowbit.model.arch import IGNORED_SUFFIXES, Arch, arch_for, check_remote_code, layer_name

SUPPORTED_DTYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts a forward pass and a quantizer need, normalised across config versions."""

    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None


def spec_from_config(c: dict[str, Any], arch: Arch, where: Path) -> ModelSpec:
    """Normalise a config.json dict into the fields lowbit uses, with a clear error for a broken one."""
    try:
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        return ModelSpec(
            arch=arch,
            vocab_size=int(c["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_token_id=c.get("bos_token_id"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LowbitError(f"{where}: missing or bad field {exc}; fix config.json") from None


class ModelFolder:
    """A HF checkpoint folder: config, tokenizer files and lazily read safetensors shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise LowbitError(f"{self.path}: model folder not found; pass an existing HF model folder")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise LowbitError(f"{cfg_path}: missing; a HF model folder needs config.json")
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LowbitError(f"{cfg_path}: invalid JSON ({exc}); fix or re-download it") from None
        if not isinstance(self.config, dict):
            raise LowbitError(f"{cfg_path}: config.json must hold a JSON object; fix or re-download it")
        check_remote_code(self.config, str(cfg_path))
        self.arch = arch_for(self.config.get("model_type"), str(cfg_path))
        self.store = TensorStore(self.path)
        for name, dtype in self.store.dtypes.items():
            if dtype not in SUPPORTED_DTYPES and name.endswith("weight"):
                raise LowbitError(
                    f"{self.store.files[name]}: tensor {name} has dtype {dtype}; lowbit reads F32, F16 and BF16 "
                    "checkpoints (dequantize it first)"
                )
        self._check_complete()

    def _check_complete(self) -> None:
        """Every tensor the arch needs is there, and nothing is there that lowbit would not carry.

        A tensor outside the arch's layout (an MLP bias, a vision tower, ...) would be silently
        dropped by every writer, so it is refused here, before any work, naming the tensor.
        """
        needed = expected_tensor_names(self.arch, self.spec)
        for name in needed:
            if name not in self.store:
                raise LowbitError(f"{self.path}: tensor {name} is missing from the safetensors files")
        known = set(needed) | {self.arch.lm_head}
        for name in self.store.names():
            if name not in known and not name.endswith(IGNORED_SUFFIXES):
                raise LowbitError(
                    f"{self.store.files[name]}: tensor {name} is not part of the {self.arch.model_type} layout "
                    "lowbit reads, and would be lost in every export; remove it or use a model of a supported "
                    "architecture")

    @cached_property
    def spec(self) -> ModelSpec:
        return spec_from_config(self.config, self.arch, self.path / "config.json")

    def names(self) -> list[str]:
        return self.store.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.store.shapes[name]

    def has(self, name: str) -> bool:
        return name in self.store

    def get(self, name: str) -> torch.Tensor:
        """One tensor as float32, read from disk on demand."""
        return self.store.get(name)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `tokens` as float32, without a float32 copy of the whole table (2 GB at 8B)."""
        table = self.store.raw(self.arch.embed)
        return table[tokens].float()

    def row_chunks(self, name: str, max_elements: int = 1 << 26):
        """(start, float32 rows) of a tensor in chunks of about `max_elements`, for tensors (an 8B's
        embedding or head) whose float32 copy alone would be larger than a decoder layer."""
        shape = self.store.shapes[name]
        step = max(1, max_elements // max(1, int(math.prod(shape[1:]))))
        for start in range(0, shape[0], step):
            yield start, self.store.rows(name, start, min(shape[0], start + step)).float()

    def lm_head_name(self) -> str:
        return self.arch.embed if self.spec.tie_word_embeddings else self.arch.lm_head

    def tokenizer_files(self) -> list[Path]:
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "generation_config.json", "chat_template.jinja")
        return [self.path / n for n in names if (self.path / n).is_file()]


def layer_tensor_shape(short: str, spec: ModelSpec) -> tuple[int, ...]:
    """The shape a layer tensor has in a checkpoint of this config (HF [out, in] for linears)."""
    d, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (spec.intermediate_size, d),
            "up": (spec.intermediate_size, d), "down": (d, spec.intermediate_size),
            "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,), "attn_norm": (d,), "ffn_norm": (d,),
            "q_norm": (spec.head_dim,), "k_norm": (spec.head_dim,)}[short]


def expected_tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint with this config and its shape, from config.json alone (for planning
    the memory of a model before downloading it); tests check it against real folders."""
    arch = spec.arch
    shapes = {arch.embed: (spec.vocab_size, spec.hidden_size)}
    for i in range(spec.num_layers):
        shapes.update({layer_name(arch, i, t): layer_tensor_shape(t.short, spec) for t in arch.layer_tensors()})
    shapes[arch.final_norm] = (spec.hidden_size,)
    if not spec.tie_word_embeddings:
        shapes[arch.lm_head] = (spec.vocab_size, spec.hidden_size)
    return shapes


def expected_tensor_names(arch: Arch, spec: ModelSpec) -> list[str]:
    """Every tensor a checkpoint of this arch and shape holds (lm_head only when untied)."""
    names = [arch.embed]
    for i in range(spec.num_layers):
        names += [layer_name(arch, i, t) for t in arch.layer_tensors()]
    names.append(arch.final_norm)
    if not spec.tie_word_embeddings:
        names.append(arch.lm_head)
    return names
