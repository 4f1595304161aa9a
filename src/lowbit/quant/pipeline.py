"""Quantize a model folder into a lowbit checkpoint, one decoder layer in memory at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit import __version__
from lowbit.formats.atomic import atomic_dir, check_writable_target
from lowbit.formats.lowbit_ckpt import LowbitWriter
from lowbit.model.hf import ModelFolder
from lowbit.quant.grid import quantize_rtn
from lowbit.quant.methods import METHODS, QuantConfig
from lowbit.report.progress import progress


@dataclass
class QuantStats:
    """Exact storage accounting of one run."""

    quantized_weights: int = 0
    quantized_bits: int = 0
    plain_weights: int = 0
    seconds: float = 0.0

    @property
    def bpw(self) -> float:
        """Bits per weight over the quantized tensors, scales and zeros included."""
        return self.quantized_bits / max(1, self.quantized_weights)

    @property
    def bpw_model(self) -> float:
        """Bits per parameter over the whole model, unquantized tensors counted at 16 bits."""
        total = self.quantized_weights + self.plain_weights
        return (self.quantized_bits + 16 * self.plain_weights) / max(1, total)

    def to_dict(self) -> dict:
        """Deterministic fields only (no wall time), so checkpoints are byte-reproducible."""
        return {"quantized_weights": self.quantized_weights, "quantized_bits": self.quantized_bits,
                "plain_weights": self.plain_weights, "bpw": self.bpw, "bpw_model": self.bpw_model}


def quantize_checkpoint(model_dir: Path, qcfg: QuantConfig, out: Path, overwrite: bool = False) -> QuantStats:
    """Write a lowbit checkpoint of `model_dir` quantized with `qcfg` to `out` (atomically)."""
    folder = ModelFolder(model_dir)
    check_writable_target(out, overwrite)
    quantize = METHODS[qcfg.method]
    stats = QuantStats()
    t0 = time.perf_counter()
    arch, spec = folder.arch, folder.spec
    with atomic_dir(out) as tmp:
        writer = LowbitWriter(tmp, folder)

        def put(name: str, tensor: torch.Tensor, quantize_it: bool, fn=quantize) -> None:
            if quantize_it and tensor.dim() == 2:
                qt = fn(tensor, None, qcfg.grid, name)
                writer.add_quantized(name, qt)
                stats.quantized_weights += tensor.numel()
                stats.quantized_bits += qt.storage_bits()
            else:
                writer.add_plain(name, tensor)
                stats.plain_weights += tensor.numel()

        rtn = lambda w, _s, g, _n: quantize_rtn(w, g)  # noqa: E731 - embeddings have no calibration
        put(arch.embed, folder.get(arch.embed), qcfg.quantize_embedding, rtn)
        linear_names = set(n for i in range(spec.num_layers) for n in folder.layer_linear_names(i))
        with progress(f"quantize {qcfg.name}", spec.num_layers) as advance:
            for layer in folder.iter_layers():
                for name, tensor in layer.items():
                    put(name, tensor, name in linear_names)
                advance()
        put(arch.final_norm, folder.get(arch.final_norm), False)
        if not spec.tie_word_embeddings:
            put(arch.lm_head, folder.get(arch.lm_head), qcfg.quantize_lm_head, rtn)
        writer.close({"quant": qcfg.to_dict(), "config_name": qcfg.name, "lowbit_version": __version__,
                      "source_model": str(model_dir), "stats": stats.to_dict()})
    stats.seconds = time.perf_counter() - t0
    return stats
