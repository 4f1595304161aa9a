"""Will it fit? Weights, KV cache and runtime buffers of a deployment, from config.json alone.

Three parts, each as the runtime itself counts it:
- weights: lowbit.plan.weights (exact for the format's grid or GGUF mix);
- KV cache: llama.cpp allocates n_layer x cells x (K + V row of n_kv_heads x head_dim) of the cache
  type, its cells being the whole context (ctx per sequence x parallel sequences) rounded up to 256;
  vLLM allocates blocks of 16 tokens, each sequence a whole number of blocks;
- runtime buffers: an estimate. llama.cpp's compute buffer is dominated by the logits of one
  micro-batch (n_vocab x n_ubatch floats) plus one layer's activations for it; vLLM profiles a forward
  of max_num_batched_tokens and keeps room for CUDA graphs.

A target is usable only up to what its runtime can take: a CUDA GPU loses its context (~0.5 GiB) to
llama.cpp, vLLM takes gpu_memory_utilization = 0.9 of it, and Apple's Metal lets a process wire about
2/3 of unified memory on machines up to 36 GB and 3/4 above (recommendedMaxWorkingSetSize).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.model.hf import ModelSpec

GiB = 1 << 30
MiB = 1 << 20
GB = 10**9

# Bytes per cached element: llama.cpp's ggml types (q8_0: 34 bytes per 32, q4_0: 18 per 32), vLLM's dtypes.
LLAMACPP_KV_TYPES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                     "q4_1": 20 / 32, "q4_0": 18 / 32}
VLLM_KV_TYPES = {"f16": 2.0, "bf16": 2.0, "auto": 2.0, "fp8": 1.0}
LLAMACPP_CELL_PAD = 256
LLAMACPP_UBATCH = 512
VLLM_BLOCK = 16
VLLM_UTILIZATION = 0.9
VLLM_BATCHED_TOKENS = 8192
CUDA_CONTEXT = 512 * MiB
CUDA_GRAPHS = 1 * GiB


@dataclass(frozen=True)
class Target:
    """One machine to fit: `count` devices of `size` bytes each."""

    name: str
    size: int
    kind: str = "cuda"  # cuda | apple
    count: int = 1

    def usable(self, runtime: str) -> int:
        """Bytes the runtime can use on all devices together."""
        if self.kind == "apple":
            if runtime == "vllm":
                return 0
            return int(self.size * (2 / 3 if self.size <= 36 * GiB else 3 / 4)) * self.count
        if runtime == "vllm":
            return int(self.size * VLLM_UTILIZATION) * self.count
        return (self.size - CUDA_CONTEXT) * self.count

    def label(self) -> str:
        return self.name if self.count == 1 else f"{self.count} x {self.name}"


TARGETS: dict[str, Target] = {
    "24gb": Target("24 GB GPU (RTX 3090/4090)", 24 * GiB),
    "48gb": Target("48 GB GPU (A6000/L40S)", 48 * GiB),
    "80gb": Target("80 GB A100/H100", 80 * GiB),
    "h200": Target("141 GB H200", 141 * GB),
    "mac36": Target("36 GB Apple unified", 36 * GiB, "apple"),
    "mac64": Target("64 GB Apple unified", 64 * GiB, "apple"),
}
ALIASES = {"3090": "24gb", "4090": "24gb", "a6000": "48gb", "l40s": "48gb", "a100": "80gb", "h100": "80gb",
           "141gb": "h200", "m3-36": "mac36", "m4-64": "mac64", "36gb-mac": "mac36", "64gb-mac": "mac64"}
_SIZE = re.compile(r"^(?:(\d+)\s*[x×*]\s*)?(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb)?$", re.IGNORECASE)


def parse_target(spec: str) -> Target:
    """--gpu: a name from TARGETS (or an alias such as 4090, h100), or a size such as 24GiB, 80GB or
    2x24GiB (two such GPUs, the model split across them)."""
    key = spec.strip().lower()
    count = 1
    m = re.match(r"^(\d+)\s*[x×*]\s*(.+)$", key)
    if m and ALIASES.get(m.group(2), m.group(2)) in TARGETS:
        count, key = int(m.group(1)), m.group(2)
    key = ALIASES.get(key, key)
    if key in TARGETS:
        t = TARGETS[key]
        return Target(t.name, t.size, t.kind, count)
    m = _SIZE.match(key)
    if not m:
        names = ", ".join(list(TARGETS) + list(ALIASES))
        raise LowbitError(f"--gpu {spec!r}: give a size such as 24GiB, 80GB or 2x24GiB, or one of: {names}")
    count = int(m.group(1) or 1)
    unit = {"g": "gib"}.get((m.group(3) or "gib").lower(), (m.group(3) or "gib").lower())
    size = int(float(m.group(2)) * {"gib": GiB, "gb": GB, "mib": MiB, "mb": 10**6}[unit])
    if size <= 0 or count <= 0:
        raise LowbitError(f"--gpu {spec!r}: the size and the count must be positive")
    unit_name = {"gib": "GiB", "gb": "GB", "mib": "MiB", "mb": "MB"}[unit]
    return Target(f"{m.group(2)} {unit_name} GPU", size, "cuda", count)


def kv_row_elements(spec: ModelSpec) -> int:
    """Elements one token adds to one layer's cache: a K and a V row of every KV head."""
    return 2 * spec.num_kv_heads * spec.head_dim


def llamacpp_cells(ctx: int, batch: int) -> int:
    """llama.cpp's KV cells: the whole context of `batch` parallel sequences of `ctx` tokens, padded to 256."""
    n = ctx * batch
    return -(-n // LLAMACPP_CELL_PAD) * LLAMACPP_CELL_PAD


def check_kv_type(kv_type: str) -> str:
    key = kv_type.strip().lower()
    if key not in LLAMACPP_KV_TYPES and key not in VLLM_KV_TYPES:
        raise LowbitError(f"--kv-type {kv_type!r}: choose one of {', '.join(sorted(set(LLAMACPP_KV_TYPES) | set(VLLM_KV_TYPES)))}")
    return key


def llamacpp_kv_bytes(spec: ModelSpec, ctx: int, batch: int, kv_type: str) -> int | None:
    """The KV buffer llama.cpp reports ("llama_kv_cache: ... KV buffer size"), K and V of one type
    (None: llama.cpp has no such cache type, e.g. fp8; q8_0 is its 8-bit one)."""
    if kv_type not in LLAMACPP_KV_TYPES:
        return None
    per_layer_row = spec.num_kv_heads * spec.head_dim
    return int(spec.num_layers * llamacpp_cells(ctx, batch) * 2 * per_layer_row * LLAMACPP_KV_TYPES[kv_type])


def vllm_kv_bytes(spec: ModelSpec, ctx: int, batch: int, kv_type: str) -> int | None:
    """vLLM's blocks for `batch` sequences of `ctx` tokens (None: vLLM has no such cache type)."""
    if kv_type not in VLLM_KV_TYPES:
        return None
    blocks = batch * -(-ctx // VLLM_BLOCK)
    return int(blocks * VLLM_BLOCK * spec.num_layers * kv_row_elements(spec) * VLLM_KV_TYPES[kv_type])


def llamacpp_compute_bytes(spec: ModelSpec, ctx: int, batch: int, ubatch: int = LLAMACPP_UBATCH) -> int:
    """Estimate of llama.cpp's compute buffer (flash attention on): one micro-batch's logits and the
    widest layer activations (gate, up and their product; q, k, v, attention out and the residual)."""
    n = min(ubatch, ctx * batch)
    q = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    per_token = spec.vocab_size + 3 * spec.intermediate_size + q + 2 * kv + 3 * spec.hidden_size
    return 4 * n * per_token


def vllm_activation_bytes(spec: ModelSpec, batch: int) -> int:
    """Estimate of vLLM's profiled peak beyond weights and KV: a forward of max_num_batched_tokens in
    16-bit activations, the sampled sequences' float32 logits, and its CUDA graphs."""
    tokens = VLLM_BATCHED_TOKENS
    q = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    act = 2 * tokens * (3 * spec.intermediate_size + q + 2 * kv + 3 * spec.hidden_size)
    return act + 4 * batch * spec.vocab_size + CUDA_GRAPHS


@dataclass
class Need:
    """What one runtime needs for one deployment; each device holds its own runtime buffers."""

    runtime: str
    weights: int
    kv: int | None  # None: the runtime has no such KV cache type
    buffers: int  # per device

    def total(self, devices: int = 1) -> int | None:
        return None if self.kv is None else self.weights + self.kv + devices * self.buffers


def needs(spec: ModelSpec, weights: int, ctx: int, batch: int, kv_type: str) -> list[Need]:
    """llama.cpp's and vLLM's needs for `batch` concurrent sequences of `ctx` tokens."""
    return [Need("llama.cpp", weights, llamacpp_kv_bytes(spec, ctx, batch, kv_type),
                 llamacpp_compute_bytes(spec, ctx, batch)),
            Need("vllm", weights, vllm_kv_bytes(spec, ctx, batch, kv_type), vllm_activation_bytes(spec, batch))]


def fits_table(need_list: list[Need], targets: list[Target]) -> list[dict]:
    """One row per target: per runtime, the bytes it can use, the need, whether it fits and the headroom
    (None where the runtime does not run there or lacks the cache type)."""
    rows = []
    for t in targets:
        row: dict = {"target": t.label(), "kind": t.kind}
        for n in need_list:
            usable, total = t.usable(n.runtime), n.total(t.count)
            row[n.runtime] = None if total is None or usable == 0 else {
                "usable": usable, "need": total, "fits": total <= usable, "headroom": usable - total}
        rows.append(row)
    return rows
