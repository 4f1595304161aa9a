"""Which quantization methods exist, and the config string that names a run of one.

A config string is `method:bits:group[:sym|asym]`, e.g. `rtn:4:128` or
`rtn:3:64:asym`; group `ch` (or -1) means per channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.errors import LowbitError
from lowbit.quant import rtn
from lowbit.quant.grid import GridConfig, QuantizedTensor

QuantizeFn = Callable[[torch.Tensor, object, GridConfig, str], QuantizedTensor]

METHODS: dict[str, QuantizeFn] = {
    "rtn": rtn.quantize_layer,
}


@dataclass(frozen=True)
class QuantConfig:
    """One quantization run: the method, its grid, and which tensors it touches."""

    method: str = "rtn"
    grid: GridConfig = GridConfig()
    quantize_embedding: bool = False
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LowbitError(
                f"--method {self.method!r} is not available; choose one of: {', '.join(sorted(METHODS))}"
            )

    @property
    def name(self) -> str:
        g = "ch" if self.grid.group_size == -1 else str(self.grid.group_size)
        sym = "" if self.grid.symmetric else ":asym"
        return f"{self.method}:{self.grid.bits}:{g}{sym}"

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "bits": self.grid.bits,
            "group_size": self.grid.group_size,
            "symmetric": self.grid.symmetric,
            "quantize_embedding": self.quantize_embedding,
            "quantize_lm_head": self.quantize_lm_head,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        grid = GridConfig(int(d["bits"]), int(d["group_size"]), bool(d["symmetric"]))
        return cls(d["method"], grid, bool(d.get("quantize_embedding")), bool(d.get("quantize_lm_head")))


def parse_config(text: str) -> QuantConfig:
    """Parse `method:bits:group[:sym|asym]` with errors that name the bad field."""
    parts = text.strip().split(":")
    if not 1 <= len(parts) <= 4 or not parts[0]:
        raise LowbitError(f"config {text!r}: expected method:bits:group[:sym|asym], e.g. rtn:4:128")
    method = parts[0]
    try:
        bits = int(parts[1]) if len(parts) > 1 else 4
    except ValueError:
        raise LowbitError(f"config {text!r}: bits {parts[1]!r} is not an integer from 2 to 8") from None
    group_text = parts[2] if len(parts) > 2 else "128"
    try:
        group = -1 if group_text in ("ch", "channel", "-1") else int(group_text)
    except ValueError:
        raise LowbitError(f"config {text!r}: group {group_text!r} must be 32, 64, 128, 256 or ch") from None
    sym_text = parts[3] if len(parts) > 3 else "sym"
    if sym_text not in ("sym", "asym"):
        raise LowbitError(f"config {text!r}: last field must be sym or asym, not {sym_text!r}")
    return QuantConfig(method, GridConfig(bits, group, sym_text == "sym"))
