"""Quantize a model folder into FP8 e4m3 compressed-tensors (per-row scales), layer by layer.

Methods:
  * rtn:  round to nearest (quant/fp8.py), the same weights llm-compressor's FP8_DYNAMIC scheme gives up to
          its rounding of the quotient (it divides in the weight's dtype; lowbit in float32);
  * gptq: the same scales, codes chosen by GPTQ on the calibration Hessians (quant/gptq_codebook.py), columns
          in act-order (free: the scales are fixed, the file has no g_idx). Sequential like every calibrated
          lowbit method.
Every decoder Linear is quantized; the embedding, norms, biases (Qwen2), q/k norms (Qwen3) and an untied
lm_head are carried as the source stores them (llm-compressor's `ignore: [lm_head]`). `--fp8-activations
dynamic` only adds the W8A8 metadata (per-token activation scales computed at run time by vLLM); the weights
are the same. Resumable per layer (`.OUT.partial/`), written atomically, byte-reproducible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lowbit import __version__
from lowbit.calib.dataset import CalibSet
from lowbit.errors import LowbitError
from lowbit.formats import compressed_tensors as ct
from lowbit.formats.atomic import check_writable_target
from lowbit.formats.packed_folder import packed_key, write_packed_folder
from lowbit.model.hf import ModelFolder, ModelSpec
from lowbit.quant import fp8
from lowbit.quant.gptq import GPTQConfig
from lowbit.quant.gptq_codebook import quantize_codebook_gptq
from lowbit.quant.codebook_layer import quantize_layer_groups
from lowbit.quant.pipeline import PartialRun, run_key, run_sequential
from lowbit.runtime import Placement, placement

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class FP8Config:
    method: str = "rtn"
    activations: str = "none"  # none (weight-only) | dynamic (W8A8-FP8 metadata)
    scale_dtype: str = "float32"  # float32 | bfloat16
    act_order: bool = True  # GPTQ: free with fixed scales (no g_idx)
    damp_percent: float = 0.01

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LowbitError(f"--method {self.method!r} with --format compressed-tensors --fp8: choose "
                              f"{' or '.join(METHODS)} (fp8 is rtn)")
        if self.activations not in ct.FP8_ACTIVATIONS:
            raise LowbitError(f"--fp8-activations {self.activations!r}: choose none (weight-only) or dynamic "
                              "(W8A8-FP8, per-token activation scales at run time)")
        if self.scale_dtype not in fp8.SCALE_DTYPES:
            raise LowbitError(f"--fp8-scale-dtype {self.scale_dtype!r}: choose float32 or bfloat16")

    @property
    def name(self) -> str:
        return f"fp8:{self.method}{':w8a8' if self.activations == 'dynamic' else ''}:{self.scale_dtype}"

    @property
    def dtype(self) -> torch.dtype:
        return fp8.SCALE_DTYPES[self.scale_dtype]

    @property
    def gptq(self) -> GPTQConfig:
        return GPTQConfig(damp_percent=self.damp_percent, act_order=self.act_order)

    def to_dict(self) -> dict:
        return {"method": self.method, "activations": self.activations, "scale_dtype": self.scale_dtype,
                "act_order": self.act_order, "damp_percent": self.damp_percent}


def quantize_linear(weight: torch.Tensor, cfg: FP8Config, fh, name: str) -> fp8.FP8Tensor:
    if fh is None:
        return fp8.quantize_rtn(weight, cfg.dtype, name)
    scale = fp8.row_scales(weight, cfg.dtype, name)
    codes = quantize_codebook_gptq(weight, fh, scale, fp8.FP8Grid(), cfg.gptq)
    return fp8.FP8Tensor(codes.view(fp8.E4M3), scale)


def quantize_layer(w: dict[str, torch.Tensor], x: torch.Tensor | None, cfg: FP8Config, spec: ModelSpec, rope,
                   names: dict[str, str], where: Placement
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(dequantized linears for the next layer's inputs, tensors to persist: packed linears and the rest)."""
    return quantize_layer_groups(
        w, x, cfg.gptq if cfg.method == "gptq" else None, spec, rope, names, where,
        lambda weight, fh, name: quantize_linear(weight, cfg, fh, name),
        lambda m, qt: {packed_key(m, sfx): t for sfx, t in ct.pack_fp8(qt).items()})


def quantize_to_fp8(model_dir: Path, cfg: FP8Config, out: Path, overwrite: bool = False,
                    calib: CalibSet | None = None, after_layer: Callable[[int], None] | None = None,
                    device: str | None = None, offload_activations: bool = False) -> dict:
    """Write `model_dir` as an FP8 compressed-tensors folder at `out` (atomic, resumable); returns its summary."""
    folder = ModelFolder(model_dir)
    check_writable_target(out, overwrite)
    qc = ct.fp8_quantization_config(cfg.activations)  # needs the library: fails before any work
    if cfg.method == "gptq" and calib is None:
        raise LowbitError("--method gptq with FP8 needs calibration text; pass --calib-text FILE")
    where = placement(device, offload_activations)
    t0 = time.perf_counter()
    use_calib = calib if cfg.method == "gptq" else None
    state = PartialRun(out, run_key(model_dir, cfg, use_calib))

    def step(i: int, w: dict[str, torch.Tensor], x: torch.Tensor | None, rope, names: dict[str, str]):
        return quantize_layer(w, x, cfg, folder.spec, rope, names, where)

    run_sequential(folder, cfg.name, state, use_calib, step, after_layer, where)
    summary = {"format": "compressed-tensors-fp8", "quant": cfg.to_dict(), "lowbit_version": __version__}
    if use_calib is not None:
        summary["calibration"] = use_calib.summary
    summary = write_packed_folder(folder, out, state.load_tensors, ct.FP8_MARKER, qc, summary, None,
                                  "the FP8 compressed-tensors export")
    state.remove()
    summary["seconds"] = time.perf_counter() - t0
    return summary
