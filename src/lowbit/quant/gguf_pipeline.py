"""Quantize a HF model folder straight into a llama.cpp GGUF, with any lowbit method.

The mix (which block type each tensor gets) is llama.cpp's own
(lowbit.quant.gguf_mix), so the file has exactly the size and layout of
llama-quantize's output for the same --type. What differs is how each tensor
lands on its block grid:

  rtn   llama.cpp's own search per block (imatrix-weighted when --imatrix is
        given): byte-identical to llama-quantize.
  gptq  GPTQ's error compensation onto the block grid (lowbit.quant.gptq_blocks),
        layer by layer on calibration inputs that went through the already
        quantized layers before.
  awq   AWQ's activation-aware scales, searched against the block grids the
        tensors will really use and folded into the norms / producers, then
        llama.cpp's search on the smoothed weights with the smoothed imatrix.
  awq-gptq  AWQ's smoothing, then GPTQ on the smoothed weights and inputs.
  autoround llama.cpp's block fits, and AutoRound's learned rounding on the block's output error against
        the float model's (lowbit.quant.autoround_blocks; i-quant tensors keep llama.cpp's search).
  hqq   no calibration: HQQ's half-quadratic (scale, zero) as the fp16 (d, m) of Q4_1 / Q5_1 blocks
        (lowbit.quant.hqq_blocks); tensors of every other type keep llama.cpp's search.

IQ2_XXS / IQ2_XS / IQ2_S / IQ3_XXS tensors (in any mix) need --imatrix, as in llama.cpp: refused
before any work without one (require_imatrix). The codes of the grid i-quants (those and IQ3_S) are
points of a grid of 4 or 8 weights at a time: under gptq / awq-gptq GPTQ sweeps them one grid group
(sign unit) at a time in natural column order, act-order ignored, damping at least LATTICE_DAMP
(lowbit.quant.gptq_blocks.quantize_lattice_gptq), then their d and sub-block scales are refitted to the
layer's output error with the codes fixed (lowbit.quant.header_refit), alternating with coordinate descent
over the grid points (lowbit.quant.lattice_cd); the scalar types whose header is d times integer sub-block
scales (legacy symmetric, IQ4_NL / IQ4_XS, Q3_K / Q6_K) get the header refit and one more column loop at
the refitted headers (the better kept); under autoround they get llama.cpp's search
(imatrix-weighted), on inputs that went through the already quantized layers.

The run is sequential and resumable like lowbit's own checkpoints: each
finished layer's rows go to `.OUT.partial/`, and the GGUF is written
atomically at the end.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lowbit import __version__
from lowbit.calib.dataset import CalibSet
from lowbit.errors import LowbitError
from lowbit.eval.reference import folder_fingerprint
from lowbit.formats.atomic import atomic_file, check_writable_target, remove_stale_temps
from lowbit.formats.gguf import gguf_tensor_order, hf_name_to_gguf, model_vocab, tensor_plan, write_gguf
from lowbit.formats.imatrix import Imatrix, check_imatrix
from lowbit.model.arch import LINEARS, layer_name
from lowbit.model.hf import ModelFolder, ModelSpec
from lowbit.quant import autoround, awq, hqq_blocks
from lowbit.quant.autoround_blocks import BlockGridParams, supports
from lowbit.quant.ggml_blocks import block_type
from lowbit.quant.gguf_mix import (FILE_TYPES, IMATRIX_TYPES, TensorInfo, choose_types, llamacpp_is_70b,
                                   parse_file_type, parse_overrides)
from lowbit.quant.gptq import GPTQConfig
from lowbit.quant.gptq_blocks import COARSE_TYPES, LATTICE_DAMP, factor_hessian, quantize_block_gptq
from lowbit.quant.grid import GridConfig
from lowbit.quant.pipeline import PartialRun, gather_stats, run_sequential
from lowbit.quant.stats import INPUT_GROUPS, LayerStats
from lowbit.quant import workers
from lowbit.quant.workers import run_jobs
from lowbit.runtime import Placement, placement

GGUF_METHODS = ("rtn", "gptq", "awq", "awq-gptq", "autoround", "hqq")
NO_CALIBRATION = ("rtn", "hqq")  # the methods that fit the weights alone
FLOAT_TYPES = ("F32", "F16")
AWQ_NORM_GRID = GridConfig(4, 32)  # only used to normalise |w| per 32-column block in AWQ's duo scaling


@dataclass(frozen=True)
class GGUFConfig:
    """One GGUF quantization run."""

    file_type: str = "Q4_K_M"
    method: str = "rtn"
    act_order: bool = True  # GPTQ only; block fits are static then, so the file needs no g_idx
    damp_percent: float = 0.01
    tensor_types: tuple[str, ...] = ()
    iters: int = 50  # autoround only: sign-gradient steps per block
    seed: int = 0  # autoround only: its mini-batch draws

    def __post_init__(self) -> None:
        object.__setattr__(self, "file_type", parse_file_type(self.file_type))
        if self.method not in GGUF_METHODS:
            raise LowbitError(f"--method {self.method!r} cannot target GGUF block types; choose one of: "
                              f"{', '.join(GGUF_METHODS)}")
        if not self.uses_gptq:
            object.__setattr__(self, "act_order", False)

    @property
    def needs_calibration(self) -> bool:
        return self.method not in NO_CALIBRATION

    @property
    def uses_gptq(self) -> bool:
        return self.method in ("gptq", "awq-gptq")

    @property
    def smooths(self) -> bool:
        return self.method in ("awq", "awq-gptq")
        parse_overrides(list(self.tensor_types))

    @property
    def name(self) -> str:
        if self.method == "autoround":
            return f"autoround-i{self.iters}:{self.file_type}"
        return f"{self.method}{'' if self.act_order or not self.uses_gptq else '-noact'}:{self.file_type}"

    def to_dict(self) -> dict:
        extra = {"iters": self.iters, "seed": self.seed} if self.method == "autoround" else {}
        return {"file_type": self.file_type, "method": self.method, "act_order": self.act_order,
                "damp_percent": self.damp_percent, "tensor_types": list(self.tensor_types), **extra}

    @property
    def autoround(self) -> autoround.AutoRoundConfig:
        return autoround.AutoRoundConfig(self.iters, seed=self.seed)


@dataclass
class GGUFStats:
    """Sizes of the written file, by ggml type."""

    linear_weights: int = 0
    linear_bytes: int = 0
    total_weights: int = 0
    total_bytes: int = 0
    type_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def bpw(self) -> float:
        """Bits per weight over the decoder's linear layers (lowbit's usual definition)."""
        return 8 * self.linear_bytes / max(1, self.linear_weights)

    @property
    def bpw_model(self) -> float:
        return 8 * self.total_bytes / max(1, self.total_weights)

    def add(self, qtype: str, numel: int, nbytes: int, linear: bool) -> None:
        self.type_counts[qtype] = self.type_counts.get(qtype, 0) + 1
        self.total_weights += numel
        self.total_bytes += nbytes
        if linear:
            self.linear_weights += numel
            self.linear_bytes += nbytes


def tensor_infos(spec: ModelSpec, shape_of: Callable[[str], tuple[int, ...]]) -> list[TensorInfo]:
    return [TensorInfo(hf_name_to_gguf(n), shape_of(n)[-1], len(shape_of(n))) for n in gguf_tensor_order(spec)]


def plan_types(folder: ModelFolder, gcfg: GGUFConfig, has_imatrix: bool) -> dict[str, str]:
    """HF name -> ggml type, exactly as llama-quantize would choose for this file type."""
    return plan_types_for(folder.spec, folder.shape, gcfg, has_imatrix)


def plan_types_for(spec: ModelSpec, shape_of: Callable[[str], tuple[int, ...]], gcfg: GGUFConfig,
                   has_imatrix: bool) -> dict[str, str]:
    """plan_types from shapes alone (a config.json, for the memory planner)."""
    is_70b = llamacpp_is_70b(spec.arch.gguf_arch, spec.num_layers, spec.num_heads, spec.num_kv_heads)
    by_gguf = choose_types(tensor_infos(spec, shape_of), gcfg.file_type, spec.num_layers,
                           spec.num_heads // spec.num_kv_heads, has_imatrix, parse_overrides(list(gcfg.tensor_types)),
                           is_70b=is_70b)
    return {n: by_gguf[hf_name_to_gguf(n)] for n in gguf_tensor_order(spec)}


def require_imatrix(types: dict[str, str], imatrix: Imatrix | None, file_type: str, decoder: set[str]) -> None:
    """Refuse, in one line, a plan with IQ2 tensors and no importance for them (llama.cpp's
    tensor_requires_imatrix / "Missing importance matrix"): no --imatrix at all, an imatrix without
    this tensor, or a tensor outside the decoder layers (token_embd / output get no imatrix)."""
    need = [n for n, t in types.items() if t in IMATRIX_TYPES]
    if not need:
        return
    if imatrix is None:
        kinds = "/".join(sorted({types[n] for n in need}))
        raise LowbitError(f"--type {file_type}: {len(need)} tensors are {kinds}, which llama.cpp (and lowbit) quantize "
                          "only with an importance matrix; pass --imatrix FILE (`lowbit imatrix MODEL -o F` "
                          "writes one)")
    outside = [n for n in need if n not in decoder]
    if outside:
        raise LowbitError(f"{outside[0]} as {types[outside[0]]} needs an importance matrix, and lowbit uses none "
                          "outside the decoder layers (nor does llama.cpp's imatrix); pick another --tensor-type")
    missing = [n for n in need if n not in imatrix]
    if missing:
        raise LowbitError(f"--imatrix has no entry for {missing[0]} ({types[missing[0]]}, and "
                          f"{len(missing) - 1} more): llama.cpp refuses such a tensor too; compute the imatrix "
                          "on this model with every layer")


def check_plan(folder: ModelFolder, gcfg: GGUFConfig, imatrix: Imatrix | None) -> dict[str, str]:
    """The plan (HF name -> ggml type), after the checks that need no work: the imatrix fits the model,
    and the IQ2 tensors have one."""
    if imatrix is not None:
        check_imatrix(imatrix, folder)
    types = plan_types(folder, gcfg, imatrix is not None)
    decoder = {layer_name(folder.arch, i, t) for i in range(folder.spec.num_layers) for t in folder.arch.layer_tensors()}
    require_imatrix(types, imatrix, gcfg.file_type, decoder)
    return types


def _run_key(model_dir: Path, gcfg: GGUFConfig, calib: CalibSet | None, imatrix: Imatrix | None) -> str:
    h = hashlib.sha256(json.dumps({**gcfg.to_dict(), "lowbit": __version__, "format": "gguf"},
                                  sort_keys=True).encode())
    h.update(folder_fingerprint(model_dir).encode())
    if calib is not None:
        h.update(calib.tokens.numpy().tobytes())
    for name in sorted(imatrix or {}):
        h.update(name.encode())
        h.update(imatrix[name].mean().tobytes())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------- one tensor / one layer


def _as_float(t: torch.Tensor, qtype: str) -> torch.Tensor:
    return t.half().float() if qtype == "F16" else t.float()


def rtn_tensor(t: torch.Tensor, qtype: str, importance: np.ndarray | None, dequantize: bool = True,
               use_hqq: bool = False) -> tuple[np.ndarray | None, torch.Tensor | None]:
    """(raw rows or None for float types, dequantized weights or None) by llama.cpp's own per-block search,
    or with `use_hqq` by HQQ's solver where the block type has a zero for it (hqq_blocks.supports).

    The dequantized copy feeds the next layer's calibration inputs; without calibration nothing reads it,
    and skipping it saves a third of an RTN file's time."""
    if qtype in FLOAT_TYPES:
        return None, _as_float(t, qtype) if dequantize else None
    bt = block_type(qtype)
    if use_hqq and hqq_blocks.supports(bt):
        raw = hqq_blocks.quantize(bt, t.float().cpu().numpy())
    else:
        raw = bt.quantize(t.float().cpu().numpy(), importance)
    return raw, torch.from_numpy(bt.dequantize(raw, t.shape[1])).to(t.device) if dequantize else None


def _importance(imatrix: Imatrix | None, name: str) -> np.ndarray | None:
    return None if imatrix is None or name not in imatrix else imatrix[name].mean()


def _stats_importance(stats: LayerStats, short: str) -> np.ndarray:
    g = stats.for_linear(short)
    return (g.sumsq / max(1, g.count)).float().cpu().numpy()


def quantize_gguf_layer(w: dict[str, torch.Tensor], x: torch.Tensor | None, gcfg: GGUFConfig, spec: ModelSpec,
                        rope, names: dict[str, str], types: dict[str, str], imatrix: Imatrix | None,
                        where: Placement = Placement(), target: torch.Tensor | None = None
                        ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """Quantize one decoder layer's linears onto their block types; `w` may be rewritten (AWQ).

    Returns (raw rows of each quantized linear, dequantized weight of every linear). `target`: the float
    model's outputs of this layer (AutoRound's loss target).
    """
    if gcfg.method == "autoround":
        return _autoround_layer(w, x, gcfg, spec, rope, names, types, imatrix, where, target)
    stats = None
    if gcfg.needs_calibration:
        assert x is not None
        # float32 products: measured KLD 0.01922 vs 0.01925 with float64 ones (Q4_K_M gptq, README: Scale)
        stats = gather_stats(x, w, spec, rope, LayerStats(True, gcfg.smooths, where.stats_dtype, sums=gcfg.smooths,
                                                          product_dtype=torch.float32), where)
    if gcfg.smooths:
        fakes = {s: _fake_block(types[names[s]]) for s, _ in LINEARS}
        awq.smooth_block(w, stats, AWQ_NORM_GRID, spec, fakes=fakes)
    rtn_jobs, gptq_jobs = [], []
    for lead, members in INPUT_GROUPS.items():
        gptq_sets: dict[tuple, list[str]] = {}
        imps = {}
        for m in members:
            qtype = types[names[m]]
            # a given imatrix describes the unsmoothed inputs: after AWQ use the smoothed statistics
            imps[m] = _stats_importance(stats, m) if gcfg.smooths else _importance(imatrix, names[m])
            if gcfg.uses_gptq and qtype not in FLOAT_TYPES:
                key = (qtype, None if imps[m] is None else np.ascontiguousarray(imps[m], np.float32).tobytes())
                gptq_sets.setdefault(key, []).append(m)
                continue
            rtn_jobs.append((m, qtype, imps[m]))
        if gptq_sets:  # one factorization per input group, shared by its linears
            gptq_jobs.append((lead, [(qtype, imps[ms[0]], ms) for (qtype, _), ms in gptq_sets.items()]))
    want_deq = x is not None
    raws: dict[str, np.ndarray] = {}
    deq: dict[str, torch.Tensor] = {}
    # On the CPU every job goes to a worker process (lowbit.quant.workers) as numpy arrays; on a GPU
    # the solves run in this process, on the device.
    ship = (lambda t: t.numpy()) if where.on_cpu else (lambda t: t)
    gptq_args = [(ship(stats.for_linear(lead).hessian), [(qtype, imp, [ship(w[m]) for m in ms]) for qtype, imp, ms
                                                         in sets], names[sets[0][2][0]], _gptq_cfg(gcfg))
                 for lead, sets in gptq_jobs]
    if where.on_cpu:
        rtn_results = _rtn_in_workers(w, rtn_jobs, want_deq, gcfg.method == "hqq")
        gptq_results = run_jobs(_gptq_job, gptq_args,
                                [sum(w[m].numel() for _, _, ms in sets for m in ms) for _, sets in gptq_jobs])
    else:
        rtn_results = [_rtn_job(w[m], qtype, imp, want_deq, gcfg.method == "hqq") for m, qtype, imp in rtn_jobs]
        gptq_results = [_gptq_job(*args) for args in gptq_args]
    members = [m for m, _, _ in rtn_jobs] + [m for _, sets in gptq_jobs for _, _, ms in sets for m in ms]
    flat = rtn_results + [r for group in gptq_results for r in group]
    for m, (raw, d) in zip(members, flat):
        if raw is not None:
            raws[m] = raw
        if d is not None:
            deq[m] = _as_tensor(d, w[m].device)
    return raws, deq


def _autoround_layer(w: dict[str, torch.Tensor], x: torch.Tensor, gcfg: GGUFConfig, spec: ModelSpec, rope,
                     names: dict[str, str], types: dict[str, str], imatrix: Imatrix | None, where: Placement,
                     target: torch.Tensor | None) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """llama.cpp's block fits (imatrix-weighted, by the calibration's mean x^2 without an imatrix), then
    the rounding learned on the whole block at once; float and i-quant tensors are fixed first."""
    assert x is not None
    stats = gather_stats(x, w, spec, rope, LayerStats(dtype=where.stats_dtype), where)
    learned: dict[str, BlockGridParams] = {}
    raws: dict[str, np.ndarray] = {}
    deq: dict[str, torch.Tensor] = {}
    for short, _ in LINEARS:
        qtype = types[names[short]]
        imp = _importance(imatrix, names[short])
        imp = _stats_importance(stats, short) if imp is None else imp
        if qtype not in FLOAT_TYPES and supports(block_type(qtype)):
            bt = block_type(qtype)
            with torch.inference_mode(False):  # learnables need autograd; the pipeline runs in inference mode
                learned[short] = BlockGridParams(w[short].cpu(), bt, bt.fit(w[short].float().cpu().numpy(), imp))
            continue
        raw, deq[short] = rtn_tensor(w[short].cpu(), qtype, None if qtype in FLOAT_TYPES else imp)
        if raw is not None:
            raws[short] = raw
    fixed = {**{k: v.cpu() for k, v in w.items()}, **deq}
    rope = type(rope)(rope.cos.cpu(), rope.sin.cpu())  # the block searches' numpy side lives on the CPU
    autoround.learn_block(fixed, x.cpu(), spec, rope, learned, gcfg.autoround,
                          None if target is None else target.cpu())
    for short, p in learned.items():
        raws[short] = p.raw()
        deq[short] = torch.from_numpy(p.btype.dequantize(raws[short], w[short].shape[1]))
    return raws, {k: v.to(w[k].device) for k, v in deq.items()}


RTN_JOB_ELEMENTS = 1 << 20  # weights per worker job: rows are independent, so tensors split evenly


def _rtn_in_workers(w: dict[str, torch.Tensor], jobs: list, want_deq: bool, use_hqq: bool = False) -> list:
    """_rtn_job over row chunks of every tensor, so the workers stay evenly loaded within a layer."""
    pieces, owner = [], []
    for k, (m, qtype, imp) in enumerate(jobs):
        rows, cols = w[m].shape
        step = rows if qtype in FLOAT_TYPES else max(1, RTN_JOB_ELEMENTS // cols)
        for start in range(0, rows, step):
            pieces.append((w[m][start:start + step].numpy(), qtype, imp, want_deq, use_hqq))
            owner.append(k)
    done = run_jobs(_rtn_job, pieces, [p[0].size for p in pieces])
    out = []
    for k in range(len(jobs)):
        parts = [done[i] for i in range(len(pieces)) if owner[i] == k]
        raw = None if parts[0][0] is None else np.concatenate([p[0] for p in parts])
        d = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
        out.append((raw, d))
    return out


def _as_tensor(a, device: torch.device) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(a).to(device)


def _rtn_job(weight, qtype: str, imp, want_deq: bool, use_hqq: bool = False):
    """(raw rows or None, dequantized weight or None) of one tensor by llama.cpp's own block search (or HQQ)."""
    t = _as_tensor(weight, torch.device("cpu"))
    raw, d = rtn_tensor(t, qtype, imp, dequantize=want_deq, use_hqq=use_hqq)
    if not want_deq:
        return raw, None
    return raw, d if isinstance(weight, torch.Tensor) else d.numpy()


def _gptq_job(hessian, sets: list, name: str, gptq: GPTQConfig) -> list:
    """GPTQ of one input group: factor its Hessian once, then each set of linears that share a block
    type and an importance as one stacked matrix (rows are independent given H, and in every ggml
    block fit, so this is exactly the per-linear result, with one column loop instead of three).
    Returns (raw, dequantized) per linear in the sets' order. The lattice i-quants (IQ2_*, IQ3_*: a group
    of 4 or 8 weights is one grid point) are swept a group at a time in natural column order, so for them
    act-order is ignored and the damping is at least LATTICE_DAMP (a second factorization); Q2_K / Q3_K keep the
    act-order setting with that damping floor too."""
    on_numpy = not isinstance(hessian, torch.Tensor)
    H = torch.from_numpy(hessian) if on_numpy else hessian
    out = []
    factors: dict[tuple, object] = {}
    for qtype, imp, weights in sets:
        ws = [torch.from_numpy(a) for a in weights] if on_numpy else weights
        bt = block_type(qtype)
        cfg = gptq
        if bt.search_only:
            cfg = replace(gptq, act_order=False, damp_percent=max(gptq.damp_percent, LATTICE_DAMP))
        elif bt.name in COARSE_TYPES:
            cfg = replace(gptq, damp_percent=max(gptq.damp_percent, LATTICE_DAMP))
        key = (cfg.act_order, cfg.damp_percent)
        if key not in factors:
            factors[key] = factor_hessian(H, ws[0].shape[1], name, cfg, keep_hessian=True)
        stacked = torch.cat(ws) if len(ws) > 1 else ws[0]
        res = quantize_block_gptq(stacked, factors[key], bt, imp, cfg)
        start = 0
        for wi in ws:
            rows = wi.shape[0]
            d = res.dequantized[start:start + rows]
            out.append((res.raw[start:start + rows], d.numpy() if on_numpy else d))
            start += rows
    return out


def _gptq_cfg(gcfg: GGUFConfig) -> GPTQConfig:
    return GPTQConfig(damp_percent=gcfg.damp_percent, act_order=gcfg.act_order, block_size=256)


# lowbit grids standing in for each block type inside AWQ's scale search: same bits, same symmetry,
# 32-column groups. The search only ranks ~20 candidate scalings, and llama.cpp's own K-quant search
# costs ~0.4 s per tensor per candidate; the final rounding always uses the real block search.
PROXY_GRID = {"Q8_0": GridConfig(8, 32), "Q4_0": GridConfig(4, 32), "Q5_0": GridConfig(5, 32),
              "Q4_1": GridConfig(4, 32, False), "Q5_1": GridConfig(5, 32, False), "Q2_K": GridConfig(2, 32, False),
              "Q3_K": GridConfig(3, 32), "Q4_K": GridConfig(4, 32, False), "Q5_K": GridConfig(5, 32, False),
              "Q6_K": GridConfig(6, 32), "IQ4_NL": GridConfig(4, 32), "IQ4_XS": GridConfig(4, 32),
              # grid i-quants: sign and magnitude per weight; Q2_K's / Q3_K's stand-ins (the final rounding is
              # llama.cpp's search)
              "IQ2_XXS": GridConfig(2, 32, False), "IQ2_XS": GridConfig(2, 32, False),
              "IQ2_S": GridConfig(2, 32, False), "IQ3_XXS": GridConfig(3, 32), "IQ3_S": GridConfig(3, 32)}


def _fake_block(qtype: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Quantize-dequantize onto (a stand-in for) a block type, for AWQ's scale search."""
    if qtype in FLOAT_TYPES:
        return lambda t: _as_float(t, qtype)
    grid = PROXY_GRID[qtype]
    return lambda t: awq.fake_quant(t, grid)


# ---------------------------------------------------------------- whole model


def quantize_to_gguf(model_dir: Path, gcfg: GGUFConfig, out: Path, overwrite: bool = False,
                     calib: CalibSet | None = None, imatrix: Imatrix | None = None,
                     after_layer: Callable[[int], None] | None = None, vocab=None,
                     device: str | None = None, offload_activations: bool = False) -> GGUFStats:
    """Write `model_dir` quantized as a llama.cpp GGUF of type `gcfg.file_type` to `out` (atomic, resumable).

    `device`: where each layer's statistics, GPTQ solve and propagation run (lowbit.runtime.Placement);
    the block searches themselves run in numpy on the CPU.

    `vocab`: the model's GGUF vocabulary when the caller already read it (to fail on an unmappable
    tokenizer before building calibration data); read here otherwise.
    """
    folder = ModelFolder(model_dir)
    check_writable_target(out, overwrite)
    types = check_plan(folder, gcfg, imatrix)
    where = placement(device, offload_activations)
    if where.on_cpu:
        workers.prestart()  # fork the block-search workers while nothing large is in memory
    if gcfg.needs_calibration and calib is None:
        raise LowbitError(f"--method {gcfg.method} needs calibration text; pass --calib-text FILE")
    spec = folder.spec
    t0 = time.perf_counter()
    vocab = vocab or model_vocab(Path(model_dir), folder.config)  # an unmappable tokenizer fails before any work
    state = PartialRun(out, _run_key(model_dir, gcfg, calib if gcfg.needs_calibration else None, imatrix))

    def step(i: int, w: dict[str, torch.Tensor], x: torch.Tensor | None, rope, names: dict[str, str],
             target: torch.Tensor | None = None):
        raws, deq = quantize_gguf_layer(w, x, gcfg, spec, rope, names, types, imatrix, where, target)
        saved = {k: v for k, v in w.items() if k not in raws}
        saved.update({f"{k}.raw": torch.from_numpy(v) for k, v in raws.items()})
        return deq, saved

    run_sequential(folder, gcfg.name, state, calib if gcfg.needs_calibration else None, step, after_layer, where,
                   fp_targets=gcfg.method == "autoround")
    # the Modelfile is written first and renamed right after the GGUF, so a full disk fails before
    # the GGUF is in place, never after it
    remove_stale_temps(modelfile_path(out))  # a killed run's; OUT's lock (held by state) covers the pair
    with atomic_file(modelfile_path(out), lock=False) as tmp:
        tmp.write_text(_modelfile_text(out, vocab.chat_template))
        stats = _write(folder, gcfg, out, state, types, vocab)
    state.remove()
    stats.seconds = time.perf_counter() - t0
    return stats


def _write(folder: ModelFolder, gcfg: GGUFConfig, out: Path, state: PartialRun, types: dict[str, str],
           vocab) -> GGUFStats:
    spec, arch = folder.spec, folder.arch
    stats = GGUFStats()
    linear_shorts = dict(LINEARS)
    short_of = {layer_name(arch, i, t): (i, t.short) for i in range(spec.num_layers) for t in arch.layer_tensors()}

    def tensors():
        layer_cache: dict[int, dict[str, torch.Tensor]] = {}
        for name in gguf_tensor_order(spec):
            qtype = types[name]
            if name in short_of:
                i, short = short_of[name]
                if i not in layer_cache:
                    layer_cache.clear()
                    layer_cache[i] = state.load_tensors(i)
                t = layer_cache[i]
                data = t[f"{short}.raw"].numpy() if f"{short}.raw" in t else t[short]
            else:
                data = _whole_tensor(folder, name, qtype)
            numel = int(np.prod(folder.shape(name)))
            nbytes = data.nbytes if isinstance(data, np.ndarray) else numel * (2 if qtype == "F16" else 4)
            stats.add(qtype, numel, nbytes, linear=name in short_of and short_of[name][1] in linear_shorts)
            yield name, data, qtype

    write_gguf(out, folder.config, tensors, vocab, name=Path(folder.path).name,
               file_type=FILE_TYPES[gcfg.file_type][1], model_dir=Path(folder.path), plan=tensor_plan(folder, types))
    return stats


def _whole_tensor(folder: ModelFolder, name: str, qtype: str):
    """A tensor outside the decoder layers (embedding, head, final norm) in its file type, quantized in
    row chunks so the 8B embedding never exists in float32 at once. No imatrix, as in llama.cpp."""
    if len(folder.shape(name)) < 2:
        return folder.get(name)
    if qtype in FLOAT_TYPES:
        parts = [rows.half() if qtype == "F16" else rows for _, rows in folder.row_chunks(name)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    raws = []
    for _, rows in folder.row_chunks(name):  # ~64M weights at a time, split again over the workers
        raws += [r for r, _ in _rtn_in_workers({"t": rows}, [("t", qtype, None)], want_deq=False)]
        del rows
    return np.concatenate(raws) if len(raws) > 1 else raws[0]


def modelfile_path(out: Path) -> Path:
    """The Ollama Modelfile written beside GGUF `out` (`ollama create NAME -f X.Modelfile`)."""
    return out.with_name(out.stem + ".Modelfile")


def _modelfile_text(out: Path, chat_template: str | None) -> str:
    lines = [f"FROM ./{out.name}"]
    template = chat_template or ""
    if "<|im_start|>" in template:  # ChatML, as SmolLM2 and Qwen use
        lines += ['TEMPLATE """{{ if .System }}<|im_start|>system',
                  '{{ .System }}<|im_end|>', '{{ end }}{{ if .Prompt }}<|im_start|>user',
                  '{{ .Prompt }}<|im_end|>', '{{ end }}<|im_start|>assistant', '{{ .Response }}<|im_end|>', '"""',
                  'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    return "\n".join(lines) + "\n"
