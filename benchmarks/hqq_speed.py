"""HQQ's solver time, lowbit against the hqq package, tensor by tensor in one process.

    benchmarks/.venvs/hqq/bin/python benchmarks/hqq_speed.py [--bits 4,3] [--group 64] [--threads 1]

On a shared 2-core machine a whole-process timing of two tools run minutes apart measures the load of the
moment as much as the tools. Here every decoder linear of the model is quantized by hqq's
`Quantizer.quantize` (optimize=True, axis=1, float32, round_zero=False: the settings of
peers/hqq_quantize.py) and by lowbit's `hqq.quantize_layer` (float zero, and integer zero) one right after
the other, in alternating order, with the weights already in memory, so both see the same load. Reports the
summed solver seconds, the ratio, and each one's summed squared weight error. Needs the hqq venv
(peers/setup_peer_venvs.sh hqq) and lowbit's src on the path (added here).

Writes benchmarks/results/hqq_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lowbit.model.default import resolve_model  # noqa: E402
from lowbit.model.hf import ModelFolder  # noqa: E402
from lowbit.quant import hqq as lowbit_hqq  # noqa: E402
from lowbit.quant.grid import GridConfig  # noqa: E402


def package_solver(bits: int, group: int):
    from hqq.core.quantize import Quantizer

    def run(w: torch.Tensor) -> torch.Tensor:
        q, meta = Quantizer.quantize(w, nbits=bits, group_size=group, optimize=True, round_zero=False, axis=1,
                                     bitpack=False, compute_dtype=torch.float32, device="cpu")
        return ((q.float() - meta["zero"]) * meta["scale"]).reshape(w.shape)
    return run


def lowbit_solver(grid: GridConfig):
    return lambda w: lowbit_hqq.quantize_layer(w, None, grid).dequantize()


def timed(fn, w: torch.Tensor) -> tuple[float, float]:
    t0 = time.perf_counter()
    deq = fn(w)
    return time.perf_counter() - t0, float((deq - w).pow(2).sum())


def run_bits(folder: ModelFolder, names: list[str], bits: int, group: int) -> list[dict]:
    solvers = {f"hqq {version('hqq')}": package_solver(bits, group),
               f"lowbit hqq:{bits}:{group}:asym:fzero": lowbit_solver(GridConfig(bits, group, False, True)),
               f"lowbit hqq:{bits}:{group}:asym": lowbit_solver(GridConfig(bits, group, False))}
    totals = {k: [0.0, 0.0] for k in solvers}
    order = list(solvers)
    for i, name in enumerate(names):
        w = folder.get(name).float()
        for label in (order if i % 2 == 0 else order[::-1]):  # alternate who goes first
            s, e = timed(solvers[label], w)
            totals[label][0] += s
            totals[label][1] += e
    ref = totals[order[0]][0]
    return [{"bits": bits, "group": group, "contender": k, "solver_s": round(s, 2), "vs_hqq": round(s / ref, 3),
             "weight_sse": round(e, 3)} for k, (s, e) in totals.items()]


def write(rows: list[dict], meta: dict) -> None:
    out = HERE / "results" / "hqq_speed"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = ["# hqq_speed", "", f"{meta['model']}: every decoder linear ({meta['tensors']} tensors), each solver "
          f"on the same in-memory weights one after the other (alternating order), {meta['threads']} torch "
          f"thread(s), {meta['cpus']} CPUs, {meta['date']}. solver s: summed time of the quantize call; "
          "weight SSE: summed squared error of the dequantized weights.", "",
          "| bits | group | contender | solver s | vs hqq | weight SSE |", "|---|---|---|---|---|---|"]
    md += [f"| {r['bits']} | {r['group']} | {r['contender']} | {r['solver_s']} | {r['vs_hqq']}x | "
           f"{r['weight_sse']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    folder = ModelFolder(resolve_model(a.model))
    names = [n for n in folder.names() if n.startswith("model.layers.") and n.endswith("proj.weight")]
    meta = {"model": folder.path.name, "tensors": len(names), "threads": a.threads, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    rows: list[dict] = []
    for b in (int(x) for x in a.bits.split(",")):
        rows += run_bits(folder, names, b, a.group)
        write(rows, meta)
        print(f"done {b}-bit", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
