"""Quantize a model folder into a lowbit checkpoint, one decoder layer in memory at a time.

Calibrated methods follow the sequential recipe of GPTQ's reference and
llm-compressor: capture the calibration inputs of layer 0, then for each
layer gather statistics with hooks, quantize it, and run it *quantized* to
make the next layer's inputs, so each layer sees the error of those before it.

Every finished layer is saved to a `.OUT.partial/` folder beside the output
(its quantized tensors, then the activations for the next layer, then a
state file, each replaced atomically). A killed run restarts from the last
finished layer and produces byte-identical output; the partial folder is
removed when the checkpoint is complete.

A run that fails on a full disk, or is stopped by SIGINT/SIGTERM, keeps the
partial folder (so the finished layers are not lost) and the CLI prints the
command that resumes it; delete `.OUT.partial/` to throw the layers away.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from lowbit import __version__
from lowbit.calib.dataset import CalibSet
from lowbit.errors import LowbitError
from lowbit.eval.reference import folder_fingerprint
from lowbit.formats.atomic import (acquire_output_lock, atomic_dir, check_writable_target, disk_full_error,
                                   is_disk_full, release_output_lock, track_partial, untrack_partial)
from lowbit.formats.lowbit_ckpt import LowbitWriter
from lowbit.model.arch import LINEARS, layer_name, layer_tensor_name
from lowbit.model.forward import batches, build_rope, decoder_layer, layer_weights
from lowbit.model.hf import ModelFolder, ModelSpec
from lowbit.quant.grid import GridConfig, QuantizedTensor, quantize_rtn
from lowbit.quant.methods import METHODS, Method, QuantConfig
from lowbit.quant.stats import FORWARD_BATCH, INPUT_GROUPS, LayerStats, gather_stats  # noqa: F401 (re-exported)
from lowbit.report.progress import info, progress
from lowbit.runtime import Placement, placement, to_cpu

LINEAR_SHORTS = tuple(short for short, _ in LINEARS)


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


# ---------------------------------------------------------------- one layer


def quantize_block(method: Method, w: dict[str, torch.Tensor], x: torch.Tensor | None, qcfg: QuantConfig,
                   spec: ModelSpec, rope, names: dict[str, str],
                   where: Placement = Placement(), target: torch.Tensor | None = None) -> dict[str, QuantizedTensor]:
    """Quantize one decoder layer's linears; `w` is updated in place (AWQ rewrites norms and producers).
    `target`: the float model's outputs of this layer, for methods with fp_targets."""
    if method.block is not None:
        assert x is not None
        return method.block(w, where.compute(x), spec, rope, qcfg,
                            None if target is None else where.compute(target))
    stats = None
    if method.needs_calibration:
        assert x is not None
        stats = gather_stats(x, w, spec, rope, LayerStats(method.hessian, method.activations, where.stats_dtype),
                             where)
    if method.smooth:
        method.smooth(w, stats, qcfg.grid, spec)
    if method.joint and stats is not None:
        return _quantize_jointly(method, w, stats, qcfg, names)
    return {short: method.quantize(w[short], stats.for_linear(short) if stats else None, qcfg.grid,
                                   names[short], qcfg) for short in LINEAR_SHORTS}


def _quantize_jointly(method: Method, w: dict[str, torch.Tensor], stats: LayerStats, qcfg: QuantConfig,
                      names: dict[str, str]) -> dict[str, QuantizedTensor]:
    """Quantize each input group's linears stacked row-wise, then split the result back by rows."""
    out = {}
    for lead, members in INPUT_GROUPS.items():
        stacked = torch.cat([w[m] for m in members])
        qt = method.quantize(stacked, stats.for_linear(lead), qcfg.grid, "+".join(names[m] for m in members), qcfg)
        row = 0
        for m in members:
            n = w[m].shape[0]
            out[m] = QuantizedTensor(qt.codes[row:row + n].clone(), qt.scales[row:row + n].clone(),
                                     qt.zeros[row:row + n].clone(), qt.config,
                                     None if qt.g_idx is None else qt.g_idx.clone())
            row += n
    return out


def propagate(x: torch.Tensor, w: dict[str, torch.Tensor], deq: dict[str, torch.Tensor], spec: ModelSpec,
              rope, where: Placement = Placement()) -> torch.Tensor:
    """The next layer's inputs: this layer run with its linears replaced by their dequantized weights."""
    full = {**w, **deq}
    for sl in batches(x.shape[0], FORWARD_BATCH):
        x[sl] = where.home(decoder_layer(where.compute(x[sl]), full, spec, rope), x)
    return x


# ---------------------------------------------------------------- resumable state


class PartialRun:
    """The `.OUT.partial` folder: per-layer results, the latest activations and a state file.

    It holds OUT's output lock (lowbit.formats.atomic) from creation until remove(), or after a failure
    until the CLI command ends (release_partials) or the object is collected, so a second process
    writing the same OUT is refused.
    A save that fails on a full disk leaves the folder as it was after the last finished layer
    (every file is replaced atomically and the half-written temporary is removed), so it resumes."""

    def __init__(self, out: Path, key: str):
        self.out = Path(out)
        self.dir = out.parent / f".{out.name}.partial"
        self.key = key
        self.done = 0
        self._lock = weakref.finalize(self, release_output_lock, acquire_output_lock(out))
        state = self.dir / "state.json"
        if state.is_file():
            saved = json.loads(state.read_text())
            if saved.get("key") == key:
                self.done = int(saved["done"])
            else:
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        track_partial(self.dir, self._lock)

    def layer_file(self, i: int) -> Path:
        return self.dir / f"layer-{i:05d}.safetensors"

    def _replace_save(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        self._replace(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))

    def _replace(self, path: Path, write: Callable[[Path], None]) -> None:
        """write(tmp) then rename it to `path`; on a full disk remove tmp and raise a one-line DiskFull."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException as exc:
            full = disk_full_error(self.out, f"saving its resumable state in {self.dir}") if is_disk_full(exc) else None
            tmp.unlink(missing_ok=True)
            if full is not None:
                raise full from None
            raise

    @staticmethod
    def flatten(qts: dict[str, QuantizedTensor], w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One layer's results as named tensors: the unquantized ones plus codes/scales/zeros[/g_idx]."""
        tensors = {k: v for k, v in w.items() if k not in qts}
        for short, qt in qts.items():
            tensors.update({f"{short}.codes": qt.codes, f"{short}.scales": qt.scales, f"{short}.zeros": qt.zeros})
            if qt.g_idx is not None:
                tensors[f"{short}.g_idx"] = qt.g_idx
        return tensors

    def save_tensors(self, i: int, tensors: dict[str, torch.Tensor], x: torch.Tensor | None,
                     x_fp: torch.Tensor | None = None) -> None:
        """Layer i's results, then the next layer's inputs (quantized stream, and the float one if carried),
        then the state: each replaced atomically."""
        self._replace_save(tensors, self.layer_file(i))
        if x is not None:
            self._replace_save({"x": x} if x_fp is None else {"x": x, "x_fp": x_fp}, self.dir / "acts.safetensors")
        state = json.dumps({"key": self.key, "done": i + 1})
        self._replace(self.dir / "state.json", lambda tmp: tmp.write_text(state))
        self.done = i + 1

    def load_activations(self, name: str = "x") -> torch.Tensor | None:
        path = self.dir / "acts.safetensors"
        return load_file(str(path)).get(name) if self.done and path.is_file() else None

    def load_layer(self, i: int, grid: GridConfig) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor]]:
        t = self.load_tensors(i)
        qts = {short: QuantizedTensor(t[f"{short}.codes"], t[f"{short}.scales"], t[f"{short}.zeros"], grid,
                                      t.get(f"{short}.g_idx")) for short in LINEAR_SHORTS}
        plain = {k: v for k, v in t.items() if "." not in k}
        return qts, plain

    def load_tensors(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.layer_file(i)))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        untrack_partial(self.dir)
        self._lock()  # release OUT's lock (once; a finalizer runs at most one time)


def run_key(model_dir: Path, qcfg, calib: CalibSet | None) -> str:
    """The resume key of a run: any config with to_dict() (QuantConfig, BnbConfig), the model and its tokens."""
    h = hashlib.sha256(json.dumps({**qcfg.to_dict(), "lowbit": __version__}, sort_keys=True).encode())
    h.update(folder_fingerprint(model_dir).encode())
    if calib is not None:
        h.update(calib.tokens.numpy().tobytes())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------- whole model

# (layer index, its weights, its calibration inputs or None, rope, HF names of its linears)
#   -> (dequantized linears to run the next layer's inputs through, tensors to persist for the layer)
# With fp_targets, step also gets target=: the float model's outputs of the layer.
LayerStep = Callable[[int, dict, "torch.Tensor | None", object, dict],
                     tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


def run_sequential(folder: ModelFolder, label: str, state: PartialRun, calib: CalibSet | None, step: LayerStep,
                   after_layer: Callable[[int], None] | None = None, where: Placement = Placement(),
                   fp_targets: bool = False) -> None:
    """Drive `step` over the layers from the first one `state` lacks, persisting each result.

    With calibration, layer i's inputs are the calibration tokens run through layers < i
    *quantized* (resumed from the saved activations), so every layer sees the error before it.
    With `fp_targets` a float stream (the same tokens through the float layers) is carried beside it,
    and each layer's float outputs are passed to `step` as `target`.
    """
    spec = folder.spec
    if state.done:
        info(f"resuming {label} after layer {state.done - 1} from {state.dir}")
    x = x_fp = rope = None
    if calib is not None:
        rope = where.rope(build_rope(folder.config, spec, calib.tokens.shape[1]))
        x = state.load_activations()
        if x is None:
            x = folder.embed_tokens(calib.tokens)
        if fp_targets:
            x_fp = state.load_activations("x_fp")
            x_fp = where.activations(x.clone() if x_fp is None else x_fp)
        x = where.activations(x)
    with torch.inference_mode(), progress(f"quantize {label}", spec.num_layers) as advance:
        for _ in range(state.done):
            advance()
        for i in range(state.done, spec.num_layers):
            w = where.weights(layer_weights(folder.get, spec, i))
            names = {short: layer_tensor_name(spec.arch, i, sfx) for short, sfx in LINEARS}
            if x_fp is not None:  # the float layer's outputs: this layer's target, the next one's float inputs
                x_fp = propagate(x_fp, w, {}, spec, rope, where)
                deq, saved = step(i, w, x, rope, names, target=x_fp)
            else:
                deq, saved = step(i, w, x, rope, names)
            if x is not None:
                x = propagate(x, w, deq, spec, rope, where)
            state.save_tensors(i, to_cpu(saved), None if x is None else x.cpu(),
                               None if x_fp is None else x_fp.cpu())
            del w, deq, saved
            if after_layer:
                after_layer(i)
            advance()



def quantize_checkpoint(model_dir: Path, qcfg: QuantConfig, out: Path, overwrite: bool = False,
                        calib: CalibSet | None = None,
                        after_layer: Callable[[int], None] | None = None,
                        device: str | None = None, offload_activations: bool = False) -> QuantStats:
    """Write a lowbit checkpoint of `model_dir` quantized with `qcfg` to `out` (atomically, resumably).

    `device` (cpu, cuda, cuda:N, mps, auto) is where each layer is quantized (lowbit.runtime.Placement)."""
    where = placement(device, offload_activations)
    folder = ModelFolder(model_dir)
    check_writable_target(out, overwrite)
    method = METHODS[qcfg.method]
    if method.needs_calibration and calib is None:
        raise LowbitError(f"--method {qcfg.method} needs calibration text; pass --calib-text FILE")
    spec = folder.spec
    t0 = time.perf_counter()
    state = PartialRun(out, run_key(model_dir, qcfg, calib if method.needs_calibration else None))

    def step(i: int, w: dict[str, torch.Tensor], x: torch.Tensor | None, rope, names: dict[str, str],
             target: torch.Tensor | None = None):
        qts = quantize_block(method, w, x, qcfg, spec, rope, names, where, target)
        # the dequantized linears only feed the next layer's calibration inputs
        deq = {} if x is None else {short: qt.dequantize() for short, qt in qts.items()}
        return deq, PartialRun.flatten(qts, w)

    run_sequential(folder, qcfg.name, state, calib if method.needs_calibration else None, step, after_layer, where,
                   fp_targets=method.fp_targets)
    stats = _assemble(folder, qcfg, out, state, calib if method.needs_calibration else None)
    state.remove()
    stats.seconds = time.perf_counter() - t0
    return stats


def _assemble(folder: ModelFolder, qcfg: QuantConfig, out: Path, state: PartialRun,
              calib: CalibSet | None) -> QuantStats:
    """Write the final checkpoint from the per-layer results (atomic rename at the end)."""
    spec, arch = folder.spec, folder.arch
    stats = QuantStats()
    with atomic_dir(out) as tmp:
        writer = LowbitWriter(tmp, folder)

        def put_plain(name: str, tensor: torch.Tensor) -> None:
            writer.add_plain(name, tensor)
            stats.plain_weights += tensor.numel()

        def put_quantized(name: str, qt: QuantizedTensor) -> None:
            writer.add_quantized(name, qt)
            stats.quantized_weights += qt.codes.numel()
            stats.quantized_bits += qt.storage_bits()

        def put_maybe_rtn(name: str, quantize_it: bool) -> None:
            # unquantized, the source's own tensor: an 8B's bf16 embedding and head stay 1 GB each, not 2
            put_quantized(name, quantize_rtn(folder.get(name), qcfg.grid)) if quantize_it else \
                put_plain(name, folder.store.raw(name))

        put_maybe_rtn(arch.embed, qcfg.quantize_embedding)
        for i in range(spec.num_layers):
            qts, plain = state.load_layer(i, qcfg.grid)
            for short, sfx in LINEARS:
                put_quantized(layer_tensor_name(arch, i, sfx), qts[short])
            for short, tensor in plain.items():
                put_plain(_plain_name(spec, i, short), tensor)
        put_plain(arch.final_norm, folder.store.raw(arch.final_norm))
        if not spec.tie_word_embeddings:
            put_maybe_rtn(arch.lm_head, qcfg.quantize_lm_head)
        meta = {"quant": qcfg.to_dict(), "config_name": qcfg.name, "lowbit_version": __version__,
                "source_model": str(folder.path), "stats": stats.to_dict()}
        if calib is not None:
            meta["calibration"] = calib.summary
        writer.close(meta)
    return stats


def _plain_name(spec: ModelSpec, i: int, short: str) -> str:
    by_short = {t.short: t for t in spec.arch.layer_tensors()}
    return layer_name(spec.arch, i, by_short[short])
