"""Compute an importance matrix from calibration text with the FP model, one layer at a time.

This is what llama.cpp's llama-imatrix measures (mean x^2 of each linear's
input columns over the calibration tokens), computed by lowbit's own forward.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.calib.dataset import CalibSet
from lowbit.formats.imatrix import Imatrix, from_layer_sums
from lowbit.model.arch import LINEARS, layer_tensor_name
from lowbit.model.forward import batches, build_rope, decoder_layer, layer_weights
from lowbit.model.hf import ModelFolder
from lowbit.quant.stats import LayerStats
from lowbit.report.progress import progress
from lowbit.runtime import placement

FORWARD_BATCH = 8


@torch.inference_mode()
def compute_imatrix(model_dir: Path, calib: CalibSet, device: str | None = None,
                    offload_activations: bool = False) -> Imatrix:
    """The importance matrix of every linear; each layer runs on `device` (lowbit.runtime.Placement)."""
    where = placement(device, offload_activations)
    folder = ModelFolder(model_dir)
    spec = folder.spec
    rope = where.rope(build_rope(folder.config, spec, calib.tokens.shape[1]))
    x = where.activations(folder.embed_tokens(calib.tokens))
    out: Imatrix = {}
    with progress("imatrix", spec.num_layers) as advance:
        for i in range(spec.num_layers):
            w = where.weights(layer_weights(folder.get, spec, i))
            stats = LayerStats(dtype=where.stats_dtype)
            for sl in batches(x.shape[0], FORWARD_BATCH):
                x[sl] = where.home(decoder_layer(where.compute(x[sl]), w, spec, rope, hook=stats), x)
            for short, sfx in LINEARS:
                g = stats.for_linear(short)
                out[layer_tensor_name(spec.arch, i, sfx)] = from_layer_sums(short, g.sumsq.cpu().double(), g.count)
            del w
            advance()
    return out
