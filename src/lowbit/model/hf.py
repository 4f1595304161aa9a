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


# Far beyond any real model (Llama 3.1 405B: 126 layers, hidden 16384, 128 heads; vocabularies reach
# about 256k), and small enough that a hostile config.json cannot make lowbit loop over 10^12 layers
# or size a tensor no machine holds before a single weight is read.
MAX_LAYERS = 1 << 14
MAX_HEADS = 1 << 14
MAX_DIM = 1 << 24  # hidden, intermediate, vocab
MAX_HEAD_DIM = 1 << 12  # real heads are 64 to 512 wide; the rope tables loop over head_dim / 2
MAX_POSITIONS = 1 << 31


class _BadField(ValueError):
    pass


def _size(c: dict[str, Any], key: str, limit: int, default: Any = None) -> int:
    """A positive whole-number field of the config, or _BadField naming it."""
    value = c.get(key, default) if default is not None else c[key]
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        n = None
    if n is None or isinstance(value, float) and value != n or not 1 <= n <= limit:
        raise _BadField(f"{key} is {str(value)[:40]!r}, not a whole number from 1 to {limit}")
    return n


def spec_from_config(c: dict[str, Any], arch: Arch, where: Path) -> ModelSpec:
    """Normalise a config.json dict into the fields lowbit uses, with a clear error for a broken one.

    Every size is checked here, once, so the readers, the planners and the forward pass can trust them:
    positive, within the bounds above, whole heads of an even width (the rotary embedding rotates
    pairs), and query heads a whole multiple of the key/value heads."""
    try:
        heads = _size(c, "num_attention_heads", MAX_HEADS)
        hidden = _size(c, "hidden_size", MAX_DIM)
        kv_heads = _size(c, "num_key_value_heads", MAX_HEADS, c.get("num_key_value_heads") or heads)
        head_dim = _size(c, "head_dim", MAX_HEAD_DIM, c.get("head_dim") or max(1, hidden // heads))
        spec = ModelSpec(
            arch=arch,
            vocab_size=_size(c, "vocab_size", MAX_DIM),
            hidden_size=hidden,
            intermediate_size=_size(c, "intermediate_size", MAX_DIM),
            num_layers=_size(c, "num_hidden_layers", MAX_LAYERS),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=_size(c, "max_position_embeddings", MAX_POSITIONS, 2048),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_token_id=c.get("bos_token_id"),
        )
    except KeyError as exc:
        raise LowbitError(f"{where}: missing field {exc}; {_fix(where)}") from None
    except _BadField as exc:
        raise LowbitError(f"{where}: {exc}; {_fix(where)}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise LowbitError(f"{where}: bad field ({exc}); {_fix(where)}") from None
    if head_dim % 2 or heads % kv_heads:
        raise LowbitError(f"{where}: head_dim {head_dim} must be even and num_attention_heads {heads} a multiple of "
                          f"num_key_value_heads {kv_heads}; {_fix(where)}")
    return spec


def _fix(where: Path) -> str:
    return "fix config.json" if Path(where).name == "config.json" else "fix or re-download the file"


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
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5000-digit number, nesting too deep
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
        needed = expected_tensor_shapes(self.spec)
        for name, shape in needed.items():
            if name not in self.store:
                raise LowbitError(f"{self.path}: tensor {name} is missing from the safetensors files")
            if self.store.shapes[name] != shape:
                raise LowbitError(
                    f"{self.store.files[name]}: tensor {name} has shape {list(self.store.shapes[name])} but "
                    f"config.json makes it {list(shape)}; the weights and config.json do not belong together "
                    "(re-download the model)")
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
