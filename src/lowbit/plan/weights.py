"""How many bytes a model's weights take in each output format, from config.json alone.

The planner never quantizes anything: the GGUF mix is chosen by the same rules the GGUF writer uses
(llama.cpp's per-tensor promotions and shape fallbacks), each block type has a fixed byte count per
block, and each HF format states the tensors its packer writes for a linear of a given shape and grid.
So the weight bytes are exact; only the file's header depends on the tokenizer, and when the model
folder is at hand (tokenizer files included) the GGUF header is written for real into a scratch file
and measured, which makes the whole file size exact too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.model.arch import arch_for, check_remote_code
from lowbit.model.hf import ModelSpec, expected_tensor_shapes, spec_from_config

HF_FORMATS = ("compressed-tensors", "gptq", "awq")
FORMATS = ("gguf", *HF_FORMATS, "bf16")
SOURCE_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# A safetensors header entry is JSON like "name":{"dtype":"I32","shape":[a,b],"data_offsets":[x,y]}: the
# name plus about 70 bytes.
SAFETENSORS_ENTRY_OVERHEAD = 70


@dataclass(frozen=True)
class WeightRequest:
    """What to size: a format and its grid (`file_type` and overrides for GGUF, bits/group for HF)."""

    format: str = "gguf"
    file_type: str = "Q4_K_M"
    tensor_types: tuple[str, ...] = ()  # GGUF REGEX=TYPE overrides, as --tensor-type
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise LowbitError(f"--format {self.format!r}: choose one of {', '.join(FORMATS)}")

    def label(self) -> str:
        if self.format == "gguf":
            return f"GGUF {self.file_type}" + (" + overrides" if self.tensor_types else "")
        if self.format == "bf16":
            return "bf16 (unquantized)"
        group = "channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.format} W{self.bits}A16 {group}{'' if self.symmetric else ' asym'}"


@dataclass
class WeightBytes:
    """Bytes per tensor, the file's header, and whether that header was measured or estimated."""

    request: WeightRequest
    tensors: dict[str, int]
    kinds: dict[str, str]  # tensor -> ggml type or grid tag
    header: int
    header_exact: bool
    n_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(self.tensors.values())

    @property
    def file(self) -> int:
        return self.weights + self.header

    @property
    def bpw(self) -> float:
        return 8 * self.weights / max(self.n_params, 1)


def load_config(model: Path | None, config: Path | None) -> tuple[dict[str, Any], Path | None]:
    """config.json of a model folder, or a config.json on its own (then no tokenizer is known)."""
    path = config if config is not None else (model / "config.json" if model is not None else None)
    if path is None:
        raise LowbitError("give a model folder or --config config.json")
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise LowbitError(f"{path}: no such config.json; pass a model folder or --config PATH")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a huge number, deep nesting
        raise LowbitError(f"{path}: not a readable JSON config ({str(exc)[:200]}); fix or re-download config.json"
                          ) from None
    if not isinstance(doc, dict):
        raise LowbitError(f"{path}: config.json must hold a JSON object")
    check_remote_code(doc, str(path))
    return doc, (path.parent if config is None else None)


def spec_of(config: dict[str, Any], where: str = "config.json") -> ModelSpec:
    return spec_from_config(config, arch_for(config.get("model_type"), where), Path(where))


def source_dtype_bytes(config: dict[str, Any]) -> int:
    """Bytes per weight of the tensors an HF export keeps unquantized (they keep the source dtype)."""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return SOURCE_DTYPE_BYTES.get(dtype, 2)


def weight_bytes(config: dict[str, Any], request: WeightRequest, model_dir: Path | None = None) -> WeightBytes:
    """The bytes of every tensor of the model in `request`'s format (see the module docstring)."""
    spec = spec_of(config)
    shapes = expected_tensor_shapes(spec)
    if request.format == "gguf":
        out = _gguf_bytes(config, spec, shapes, request, model_dir)
    else:
        out = _hf_bytes(config, spec, shapes, request)
    out.n_params = sum(_numel(s) for s in shapes.values())
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def ggml_bytes(qtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of one tensor of a ggml type as the GGUF writer stores it (1-D float tensors are F32)."""
    import gguf

    if qtype in ("F32", "F16"):
        return _numel(shape) * (2 if qtype == "F16" and len(shape) == 2 else 4)
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    rows, cols = shape
    return rows * (cols // block) * nbytes


def _gguf_bytes(config: dict[str, Any], spec: ModelSpec, shapes: dict[str, tuple[int, ...]],
                request: WeightRequest, model_dir: Path | None) -> WeightBytes:
    from lowbit.formats.gguf import ROPE_FREQS, gguf_tensor_order, llama3_rope_factors
    from lowbit.quant.gguf_pipeline import GGUFConfig, plan_types_for

    gcfg = GGUFConfig(request.file_type, "rtn", tensor_types=request.tensor_types)
    types = plan_types_for(spec, shapes.__getitem__, gcfg, has_imatrix=False)
    tensors = {n: ggml_bytes(types[n], shapes[n]) for n in types}
    rope = llama3_rope_factors(config, spec.head_dim)
    if rope is not None:
        tensors[ROPE_FREQS] = rope.nbytes
        types = {**types, ROPE_FREQS: "F32"}
    plan = [(n, types[n], shapes[n]) for n in gguf_tensor_order(spec)]
    header, exact = _gguf_header(config, spec, plan, sum(tensors.values()), gcfg, model_dir)
    return WeightBytes(request, tensors, types, header, exact)


def _gguf_header(config, spec, plan, data_bytes: int, gcfg, model_dir) -> tuple[int, bool]:
    """(file bytes that are not tensor data, measured?): the header and the alignment padding, written
    for real when the tokenizer is at hand, else estimated from the vocabulary size."""
    from lowbit.formats.gguf import gguf_file_bytes, model_vocab
    from lowbit.quant.gguf_mix import FILE_TYPES

    if model_dir is not None:
        try:
            vocab = model_vocab(model_dir, config)
        except LowbitError:
            vocab = None
        if vocab is not None:
            header, data = gguf_file_bytes(config, plan, vocab, name=model_dir.name,
                                           file_type=FILE_TYPES[gcfg.file_type][1], model_dir=model_dir)
            return header + data - data_bytes, True
    # Tokens (u64 length + ~8 bytes of text), token types (i32) and ~1 merge per token (u64 + ~10 bytes).
    return 64 * 1024 + spec.vocab_size * (16 + 4 + 18) + len(plan) * 96, False


def _hf_bytes(config: dict[str, Any], spec: ModelSpec, shapes: dict[str, tuple[int, ...]],
              request: WeightRequest) -> WeightBytes:
    """Decoder linears in the format's packed tensors, everything else in the source dtype."""
    from lowbit.formats.hf_export import TensorInfo, get_format, linear_suffixes, storage_group
    from lowbit.quant.grid import GridConfig

    plain = source_dtype_bytes(config)
    linears = [n for n in shapes if n.endswith(linear_suffixes())] if request.format != "bf16" else []
    tensors = {n: _numel(s) * plain for n, s in shapes.items() if n not in linears}
    kinds = {n: str(config.get("torch_dtype") or config.get("dtype") or "bfloat16") for n in tensors}
    header = 8 + sum(len(n) + SAFETENSORS_ENTRY_OVERHEAD for n in tensors)
    if linears:
        fmt = get_format(request.format)
        grid = GridConfig(request.bits, request.group_size, request.symmetric)
        infos = [TensorInfo(n, shapes[n], grid, False) for n in linears]
        stored = GridConfig(grid.bits, storage_group(infos), grid.symmetric)
        for info in infos:
            reason = fmt.problem(info, stored.group_size)
            if reason is not None:
                raise LowbitError(f"{fmt.name} cannot hold {reason} [{info.name}, {grid.tag()}]")
            parts = fmt.stored_tensors(*info.shape, stored)
            tensors[info.name] = sum(_numel(shape) * dtype.itemsize for shape, dtype in parts.values())
            kinds[info.name] = grid.tag()
            header += sum(len(info.name) + len(sfx) + SAFETENSORS_ENTRY_OVERHEAD for sfx in parts)
    return WeightBytes(request, tensors, kinds, header, False)
