"""Process-level knobs for running torch on small CPUs."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from lowbit.errors import LowbitError


@contextmanager
def single_thread() -> Iterator[None]:
    """Run a block of many small tensor ops on one thread.

    Column-by-column loops (GPTQ) and grid searches issue thousands of tiny ops;
    with two OpenMP threads each op pays a barrier, and when another process
    holds a core the barrier waits for a descheduled thread: measured 35.8 s vs
    1.7 s for one GPTQ matrix on a loaded 2-core machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- devices

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str | None) -> torch.device:
    """The torch device a `--device` value names, refusing one this machine does not have.

    `auto` takes the first CUDA GPU, then Apple's MPS, then the CPU; None means the CPU.
    """
    name = (name or "cpu").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise LowbitError("--device mps: this torch sees no Apple GPU (MPS); use --device cpu or auto")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2] or "0"
        if not index.isdigit():
            raise LowbitError(f"--device {name}: a CUDA device is cuda or cuda:N with N a GPU index")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index) >= count:
            built = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise LowbitError(f"--device {name}: torch ({torch.__version__}, {built}) sees {count} CUDA GPU(s); "
                              "use --device cpu, or install a CUDA build of torch on a GPU machine")
        return torch.device(f"cuda:{index}")
    raise LowbitError(f"--device {name!r}: unknown device; choose {DEVICE_CHOICES}")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware (a CUDA GPU from Ampere on; a CPU with
    AVX512-BF16 or AMX), so mixed precision is faster there rather than emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or amx())
    return False


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


@dataclass(frozen=True)
class Placement:
    """Where a layer-by-layer run computes.

    The model stays on disk; each decoder layer's weights go to `device` for its statistics, its
    solve and its propagation, then are freed. Calibration activations live on `device` too, or in
    (pinned) CPU memory with `offload_activations`, each forward batch copied over and back, when
    samples x seqlen x hidden floats would not fit beside a layer.
    On the CPU every move is a no-op, so the CPU path is exactly the code without devices.
    """

    device: torch.device = torch.device("cpu")
    offload_activations: bool = False

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def stats_dtype(self) -> torch.dtype:
        """Activation statistics: float64 on the CPU (exact, and cheap there); float32 on a GPU,
        whose float64 throughput is a small fraction (MPS has none). Solves upcast as they need."""
        return torch.float64 if self.on_cpu else torch.float32

    def weights(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return w if self.on_cpu else {k: v.to(self.device) for k, v in w.items()}

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Calibration activations in their home: the device, or pinned CPU memory when offloaded."""
        if self.on_cpu:
            return x
        if self.offload_activations:
            x = x.cpu()
            return x.pin_memory() if self.device.type == "cuda" else x
        return x.to(self.device)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """One batch of activations on the device for a forward pass."""
        return x if x.device == self.device else x.to(self.device, non_blocking=True)

    def rope(self, rope):
        """A rope table (lowbit.model.forward.Rope) on the device."""
        if self.on_cpu:
            return rope
        return type(rope)(rope.cos.to(self.device), rope.sin.to(self.device))

    def home(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A batch's result back where `like` (the activation buffer) lives."""
        return y if y.device == like.device else y.to(like.device)


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v if v.device.type == "cpu" else v.cpu() for k, v in tensors.items()}


_CURRENT: list[Placement] = [Placement()]


def placement(device: str | None = None, offload_activations: bool = False) -> Placement:
    """The placement a run asked for; with no device, the one `computing_on` set (the CPU by default)."""
    if device is None and not offload_activations:
        return _CURRENT[-1]
    return Placement(resolve_device(device), offload_activations)


@contextmanager
def computing_on(device: str | None, offload_activations: bool = False) -> Iterator[Placement]:
    """Make every forward pass, statistic and solve inside the block run on `device`.

    The CLI's `--device` and the Python API set this once per command, so the evaluation forward
    (lowbit.model.forward) and the quantizers agree without every signature carrying a device.
    """
    _CURRENT.append(placement(device, offload_activations))
    try:
        yield _CURRENT[-1]
    finally:
        _CURRENT.pop()


def use_device(device: str | None, offload_activations: bool = False) -> Placement:
    """Set the placement for the rest of the current `preserved_placement` scope (one CLI command)."""
    _CURRENT[-1] = Placement(resolve_device(device), offload_activations)
    return _CURRENT[-1]


@contextmanager
def preserved_placement() -> Iterator[None]:
    """Whatever `use_device` sets inside the block is undone after it."""
    _CURRENT.append(_CURRENT[-1])
    try:
        yield
    finally:
        _CURRENT.pop()
