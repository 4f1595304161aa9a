"""Which quantization methods exist, and the config string that names a run of one.

A config string is `method:bits:group[:flag...]`, e.g. `rtn:4:128`,
`rtn:3:64:asym` or `gptq:4:128:act`; group `ch` (or -1) means per channel.
Flags: `sym` (default) / `asym`, for GPTQ `act` (act-order with g_idx)
and `static` (act-order with static groups, no g_idx), for AutoRound `iN` (N iterations, e.g. `i200`), `rN`
(learn each block N times with other seeds, keep the lowest calibration error; N times the time),
`plain` (SignRound alone, as the auto-round package: no AWQ equalization first) and `fp32` (float32
matmuls where the hardware has bfloat16 ones: AutoRound's default, like auto-round's on CPU, is bfloat16 there).
"""

from __future__ import annotations

import re

from dataclasses import dataclass, replace
from typing import Callable

import torch

from lowbit.errors import LowbitError
from lowbit.quant import autoround, awq, gptq, hqq, rtn
from lowbit.quant.grid import GridConfig, QuantizedTensor

QuantizeFn = Callable[[torch.Tensor, object, GridConfig, str, "QuantConfig"], QuantizedTensor]


@dataclass(frozen=True)
class Method:
    """How a method plugs into the layer pipeline.

    `quantize` is the per-linear interface quantize_layer(weight, stats, grid, name);
    `smooth` (optional) rewrites a whole block first (AWQ's scale folding);
    the flags say which statistics the calibration pass must gather;
    `joint` says the method treats output rows independently given the shared
    input statistic, so linears reading the same input (q/k/v, gate/up) can be
    quantized as one stacked matrix: the same result, one pass instead of three.
    """

    quantize: QuantizeFn
    needs_calibration: bool = False
    hessian: bool = False
    activations: bool = False
    smooth: Callable | None = None
    joint: bool = False
    block: Callable | None = None  # learns a whole block at once (AutoRound): (w, x, spec, rope, qcfg, target)
    fp_targets: bool = False  # block methods: the pipeline also carries the float stream, whose layer outputs
    #                           are the block's target (auto-round's quantized-input / float-target pairing)


def _rtn(weight: torch.Tensor, stats: object, grid: GridConfig, name: str, qcfg: "QuantConfig") -> QuantizedTensor:
    return rtn.quantize_layer(weight, stats, grid, name)


def _gptq(weight: torch.Tensor, stats: object, grid: GridConfig, name: str, qcfg: "QuantConfig") -> QuantizedTensor:
    hessian = getattr(stats, "hessian", stats)
    if hessian is None:
        raise LowbitError(f"--method gptq needs calibration data (a Hessian) for {name}; pass --calib-text FILE")
    opts = gptq.GPTQConfig(damp_percent=qcfg.damp_percent, act_order=qcfg.act_order or qcfg.static_groups,
                           static_groups=qcfg.static_groups)
    return gptq.quantize_layer(weight, hessian, grid, name, gptq=opts)


def _hqq(weight: torch.Tensor, stats: object, grid: GridConfig, name: str, qcfg: "QuantConfig") -> QuantizedTensor:
    return hqq.quantize_layer(weight, stats, grid, name)


def _no_linear_path(weight: torch.Tensor, stats: object, grid: GridConfig, name: str, qcfg: "QuantConfig"
                    ) -> QuantizedTensor:
    raise LowbitError(f"{name}: {qcfg.method} learns whole decoder blocks; it has no per-linear path")


def _awq(weight: torch.Tensor, stats: object, grid: GridConfig, name: str, qcfg: "QuantConfig") -> QuantizedTensor:
    return awq.quantize_layer(weight, stats, grid, name)


METHODS: dict[str, Method] = {
    "rtn": Method(_rtn),
    "gptq": Method(_gptq, needs_calibration=True, hessian=True, joint=True),
    "awq": Method(_awq, needs_calibration=True, hessian=True, activations=True, smooth=awq.smooth_block),
    "hqq": Method(_hqq),
    "autoround": Method(_no_linear_path, needs_calibration=True, fp_targets=True,
                        block=lambda w, x, spec, rope, qcfg, target:
                        autoround.quantize_block(w, x, spec, rope, qcfg.grid, qcfg.autoround, target)),
}
FLOAT_ZERO_METHODS = ("rtn", "hqq")  # the methods whose fit keeps a float zero (GridConfig.float_zero)


@dataclass(frozen=True)
class QuantConfig:
    """One quantization run: the method, its grid, and which tensors it touches."""

    method: str = "rtn"
    grid: GridConfig = GridConfig()
    quantize_embedding: bool = False
    quantize_lm_head: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    iters: int = 50  # autoround only: auto-round's 'light' recipe (the paper's 200 is --iters 200)
    lr: float = 0.0  # autoround only; 0 means 1 / iters
    seed: int = 0  # autoround only: its mini-batch draws
    plain: bool = False  # autoround only: SignRound alone (AutoRoundConfig.plain)
    restarts: int = 1  # autoround only: runs per block, the lowest calibration error kept
    fp32: bool = False  # autoround only: float32 matmuls even where the hardware has bfloat16 ones

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LowbitError(
                f"--method {self.method!r} is not available; choose one of: {', '.join(sorted(METHODS))}"
            )
        if self.grid.float_zero and self.method not in FLOAT_ZERO_METHODS:
            raise LowbitError(f"--float-zero (config flag fzero) applies to --method "
                              f"{' or '.join(FLOAT_ZERO_METHODS)}, not {self.method}")

    @property
    def name(self) -> str:
        g = "ch" if self.grid.group_size == -1 else str(self.grid.group_size)
        flags = "" if self.grid.symmetric else ":asym"
        flags += ":fzero" if self.grid.float_zero else ""
        flags += ":static" if self.static_groups else ":act" if self.act_order else ""
        flags += f":i{self.iters}" if self.method == "autoround" else ""
        flags += f":r{self.restarts}" if self.restarts > 1 else ""
        flags += ":plain" if self.plain else ""
        flags += ":fp32" if self.fp32 else ""
        return f"{self.method}:{self.grid.bits}:{g}{flags}"

    @property
    def autoround(self) -> "autoround.AutoRoundConfig":
        base = (autoround.AutoRoundConfig.plain(self.iters, self.lr or None, self.seed) if self.plain
                else autoround.AutoRoundConfig(self.iters, self.lr or None, seed=self.seed))
        return replace(base, restarts=self.restarts, amp=False if self.fp32 else None)

    def to_dict(self) -> dict:
        extra = ({"iters": self.iters, "lr": self.lr, "seed": self.seed, "plain": self.plain,
                  "restarts": self.restarts, "fp32": self.fp32}
                 if self.method == "autoround" else {})
        return extra | {
            "method": self.method,
            "bits": self.grid.bits,
            "group_size": self.grid.group_size,
            "symmetric": self.grid.symmetric,
            "float_zero": self.grid.float_zero,
            "quantize_embedding": self.quantize_embedding,
            "quantize_lm_head": self.quantize_lm_head,
            "act_order": self.act_order,
            "static_groups": self.static_groups,
            "damp_percent": self.damp_percent,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        grid = GridConfig.from_meta(d)
        return cls(d["method"], grid, bool(d.get("quantize_embedding")), bool(d.get("quantize_lm_head")),
                   bool(d.get("act_order")), bool(d.get("static_groups")), float(d.get("damp_percent", 0.01)),
                   int(d.get("iters", 50)), float(d.get("lr", 0.0)), int(d.get("seed", 0)), bool(d.get("plain")),
                   int(d.get("restarts", 1)), bool(d.get("fp32")))


def parse_config(text: str) -> QuantConfig:
    """Parse `method:bits:group[:flag...]` with errors that name the bad field."""
    parts = text.strip().split(":")
    if not parts[0]:
        raise LowbitError(f"config {text!r}: expected method:bits:group[:flags], e.g. rtn:4:128")
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
    flags = set(parts[3:])
    iters = [f for f in flags if re.fullmatch(r"i[1-9][0-9]*", f)]
    restarts = [f for f in flags if re.fullmatch(r"r[1-9][0-9]*", f)]
    if (iters or restarts) and method != "autoround":
        raise LowbitError(f"config {text!r}: iN (iterations) and rN (restarts) apply to autoround only")
    flags -= set(iters) | set(restarts)
    unknown = flags - {"sym", "asym", "act", "static", "fzero", "plain", "fp32"}
    if unknown:
        raise LowbitError(f"config {text!r}: unknown flag(s) {', '.join(sorted(unknown))}; "
                          "use sym, asym, act, static, fzero, plain, fp32")
    for flag in ("plain", "fp32"):
        if flag in flags and method != "autoround":
            raise LowbitError(f"config {text!r}: {flag} applies to autoround only")
    if {"act", "static"} & flags and method != "gptq":
        raise LowbitError(f"config {text!r}: act/static apply to gptq only")
    return QuantConfig(method, GridConfig(bits, group, "asym" not in flags, "fzero" in flags), act_order="act" in flags,
                       static_groups="static" in flags, iters=int(iters[0][1:]) if iters else 50,
                       plain="plain" in flags, restarts=int(restarts[0][1:]) if restarts else 1,
                       fp32="fp32" in flags)
