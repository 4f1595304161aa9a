"""Quantize a model folder into an AQLM checkpoint (2x8 or 1x16 codebooks, group 8), layer by layer.

Sequential like every calibrated lowbit method: each decoder layer's input Hessians are gathered from the
outputs of the layers before it, already quantized, and each Linear is fitted by quant/aqlm.py against its
input group's Hessian. Resumable per layer (`.OUT.partial/`), written atomically, every source tensor carried
(formats/packed_folder.py). The head and the embedding stay as the source stores them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from lowbit import __version__
from lowbit.calib.dataset import CalibSet
from lowbit.errors import LowbitError
from lowbit.formats import aqlm as aqlm_format
from lowbit.formats.atomic import check_writable_target
from lowbit.formats.packed_folder import check_row_widths, packed_key, write_packed_folder
from lowbit.model.arch import LINEARS
from lowbit.model.hf import ModelFolder, ModelSpec
from lowbit.quant import aqlm
from lowbit.quant.aqlm import AQLMConfig
from lowbit.quant.pipeline import PartialRun, gather_stats, run_key, run_sequential
from lowbit.quant.stats import INPUT_GROUPS, LayerStats
from lowbit.runtime import Placement, placement


def parse_shape(text: str) -> tuple[int, int]:
    if text not in aqlm.SHAPES:
        raise LowbitError(f"AQLM codebooks {text!r}: use one of {', '.join(aqlm.SHAPES)} "
                          "(number of codebooks x bits per code)")
    return aqlm.SHAPES[text]


def check_shapes(folder: ModelFolder, cfg: AQLMConfig) -> None:
    """A row is cut into groups of in_group inputs; aqlm's layer asserts the width divides."""
    check_row_widths(folder, cfg.in_group, "AQLM groups would straddle rows; use another format")


def quantize_layer(w: dict[str, torch.Tensor], x: torch.Tensor, cfg: AQLMConfig, spec: ModelSpec, rope,
                   where: Placement) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(dequantized linears, tensors to persist: packed linears and the layer's other tensors)."""
    stats = gather_stats(x, w, spec, rope, LayerStats(True, False, where.stats_dtype, sums=False,
                                                      product_dtype=torch.float32), where)
    deq, saved = {}, {k: v for k, v in w.items() if k not in dict(LINEARS)}
    for lead, members in INPUT_GROUPS.items():
        H = stats.for_linear(lead).hessian.cpu()
        for m in members:
            qt = aqlm.quantize(w[m].float().cpu(), H, cfg)
            deq[m] = qt.dequantize().to(w[m].device)
            saved.update({packed_key(m, sfx): t for sfx, t in aqlm_format.pack(qt, cfg.nbits).items()})
    return deq, saved


def quantize_to_aqlm(model_dir: Path, cfg: AQLMConfig, out: Path, overwrite: bool = False,
                     calib: CalibSet | None = None, after_layer: Callable[[int], None] | None = None,
                     device: str | None = None, offload_activations: bool = False) -> dict:
    """Write `model_dir` as an AQLM folder at `out` (atomic, resumable); returns its summary."""
    folder = ModelFolder(model_dir)
    check_writable_target(out, overwrite)
    check_shapes(folder, cfg)
    if calib is None:
        raise LowbitError("--format aqlm needs calibration text (its codes minimise each layer's output error); "
                          "pass --calib-text FILE")
    where = placement(device, offload_activations)
    t0 = time.perf_counter()
    plain_dtype = folder.store.raw(folder.arch.embed).dtype
    state = PartialRun(out, run_key(model_dir, cfg, calib))

    def step(i: int, w: dict[str, torch.Tensor], x: torch.Tensor | None, rope, names: dict[str, str]):
        assert x is not None
        return quantize_layer(w, x, cfg, folder.spec, rope, where)

    run_sequential(folder, cfg.name, state, calib, step, after_layer, where)
    summary = {"format": "aqlm", "quant": cfg.to_dict(), "lowbit_version": __version__}
    summary = write_packed_folder(folder, out, state.load_tensors, aqlm_format.MARKER,
                                  aqlm_format.quantization_config(cfg, ["lm_head"]), summary, plain_dtype,
                                  "the AQLM export")
    state.remove()
    summary["seconds"] = time.perf_counter() - t0
    return summary
