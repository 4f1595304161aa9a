"""`lowbit memory`: size a deployment before quantizing, or before downloading the weights at all."""

from __future__ import annotations

from pathlib import Path

from lowbit.plan.memory import GiB, MiB, TARGETS, Target, check_kv_type, fits_table, llamacpp_cells, needs, \
    parse_target
from lowbit.plan.weights import WeightRequest, load_config, spec_of, weight_bytes


def memory_plan(model: Path | None, config: Path | None, request: WeightRequest, ctx: int, batch: int,
                kv_type: str = "f16", gpus: list[str] | None = None) -> dict:
    """Weights (per ggml type or grid), KV cache and buffers per runtime, and the fits table, as JSON."""
    from lowbit.errors import LowbitError

    if ctx < 1 or batch < 1:
        raise LowbitError(f"--ctx {ctx} --batch {batch}: both must be at least 1")
    kv_type = check_kv_type(kv_type)
    doc, model_dir = load_config(model, config)
    spec = spec_of(doc, str(config or model))
    w = weight_bytes(doc, request, model_dir)
    targets = [parse_target(g) for g in gpus] if gpus else list(TARGETS.values())
    need_list = needs(spec, w.weights, ctx, batch, kv_type)
    by_kind: dict[str, int] = {}
    for name, nbytes in w.tensors.items():
        by_kind[w.kinds[name]] = by_kind.get(w.kinds[name], 0) + nbytes
    return {
        "model": str(model_dir or config), "format": request.label(), "params": w.n_params,
        "weights": {"bytes": w.weights, "bpw": round(w.bpw, 4), "by_type": by_kind, "file_bytes": w.file,
                    "file_exact": w.header_exact},
        "deployment": {"ctx": ctx, "batch": batch, "kv_type": kv_type, "llamacpp_cells": llamacpp_cells(ctx, batch)},
        "runtimes": {n.runtime: {"kv": n.kv, "buffers_per_device": n.buffers} for n in need_list},
        "targets": fits_table(need_list, targets),
    }


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


def _fit_cell(cell: dict | None) -> str:
    if cell is None:
        return "n/a"
    verdict = "fits" if cell["fits"] else "NO"
    return f"{verdict} ({_size(cell['need'])} of {_size(cell['usable'])})"


def render_memory(plan: dict) -> str:
    """The plan as the markdown the command prints."""
    w, d = plan["weights"], plan["deployment"]
    lines = [f"# memory: {plan['model']}", "",
             f"{plan['format']}: {plan['params'] / 1e9:.3f}B parameters, weights {_size(w['bytes'])} "
             f"({w['bpw']:.3f} bits/weight), file {_size(w['file_bytes'])}"
             f"{'' if w['file_exact'] else ' (header estimated: no tokenizer at hand)'}", "",
             "| type | bytes |", "|---|---|"]
    lines += [f"| {k} | {_size(v)} |" for k, v in sorted(w["by_type"].items(), key=lambda kv: -kv[1])]
    lines += ["", f"Deployment: {d['batch']} concurrent sequence(s) x {d['ctx']} tokens, KV cache {d['kv_type']}.", "",
              "| runtime | KV cache | runtime buffers per device (estimate) |", "|---|---|---|"]
    for name, r in plan["runtimes"].items():
        lines.append(f"| {name} | {_size(r['kv'])} | {_size(r['buffers_per_device'])} |")
    lines += ["", "| target | llama.cpp | vLLM |", "|---|---|---|"]
    for row in plan["targets"]:
        lines.append(f"| {row['target']} | {_fit_cell(row['llama.cpp'])} | {_fit_cell(row['vllm'])} |")
    lines += ["", "llama.cpp: the whole context in cells of the KV type; usable = GPU minus the CUDA context, or "
              "Metal's working set (2/3 of unified memory up to 36 GB, 3/4 above). vLLM: 90% of the GPU "
              "(gpu_memory_utilization), KV in 16-token blocks."]
    return "\n".join(lines) + "\n"


__all__ = ["memory_plan", "render_memory", "Target"]
