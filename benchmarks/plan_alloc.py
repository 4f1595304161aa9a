"""The allocation itself: lowbit's planned per-tensor mix against llama.cpp's stock mixes at equal size.

For each stock file type (Q4_K_M, Q3_K_M, Q2_K) and each method (imatrix = llama.cpp's own block search
weighted by the importance matrix, byte-identical to llama-quantize; gptq = lowbit's GPTQ on the same
grids), the stock file is written, and `lowbit plan --size <its exact size>` plans and verifies a mix
with the same method. Both are scored by the same code on held-out Wikipedia and on Botchan (out of
domain). The plan prices tensors on the calibration text only.

The embedded model's weights sit on Q4_1's grid (README), so the plan is not offered Q4_1 or Q5_1,
which would reproduce them for free; the stock mixes keep whatever llama.cpp's rules give them.

    python benchmarks/plan_alloc.py                       # writes benchmarks/results/plan_alloc.{json,md}
    python benchmarks/plan_alloc.py --types Q4_K_M --methods imatrix --name plan_smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lowbit.calib.dataset import CalibConfig, build_calibration  # noqa: E402
from lowbit.calib.imatrix import compute_imatrix  # noqa: E402
from lowbit.calib.text import resolve_text  # noqa: E402
from lowbit.eval.data import load_tokenizer  # noqa: E402
from lowbit.model.default import resolve_model  # noqa: E402
from lowbit.pipeline.plan import Budget, PlanSettings, _measure, _session, make_plan  # noqa: E402
from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf  # noqa: E402

NOT_SOURCE_GRID = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0")


def stock_file(model_dir: Path, file_type: str, method: str, calib, imatrix, out: Path) -> float:
    t0 = time.perf_counter()
    gcfg = GGUFConfig(file_type, "rtn" if method == "imatrix" else method)
    quantize_to_gguf(model_dir, gcfg, out, overwrite=True, calib=calib if method != "imatrix" else None,
                     imatrix=imatrix if method == "imatrix" else None)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--methods", default="imatrix,gptq")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--work", default="/tmp/lowbit-plan-bench")
    ap.add_argument("--name", default="plan_alloc")
    args = ap.parse_args()

    model_dir = resolve_model(args.model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ccfg = CalibConfig(args.calib_samples, args.calib_seqlen, 0, "chunk")
    calib = build_calibration(load_tokenizer(model_dir), resolve_text(None, "wiki-calib"), ccfg, 8192)
    imatrix = compute_imatrix(model_dir, calib)
    rows = []
    for method in args.methods.split(","):
        settings = PlanSettings(method, None, ccfg, NOT_SOURCE_GRID, None, "botchan", 512, args.windows)
        sessions = _session(model_dir, settings)
        for ft in args.types.split(","):
            stock = work / f"stock-{method}-{ft}.gguf"
            secs = stock_file(model_dir, ft, method, calib, imatrix, stock)
            s = _measure(sessions, stock, settings)
            t0 = time.perf_counter()
            plan = make_plan(model_dir, Budget(size=stock.stat().st_size), settings, work / f"plan-{method}-{ft}")
            p = plan.rounds[-1]
            row = {"method": method, "file_type": ft, "stock_bytes": stock.stat().st_size, "plan_bytes": p["bytes"],
                   "stock_kld": s["kld"], "plan_kld": p["kld"], "stock_ood_kld": s["ood_kld"],
                   "plan_ood_kld": p["ood_kld"], "kld_ratio": p["kld"] / s["kld"],
                   "ood_ratio": p["ood_kld"] / s["ood_kld"], "plan_estimated_kld": p["estimated_kld"],
                   "stock_top1": s["top1"], "plan_top1": p["top1"], "stock_seconds": round(secs, 1),
                   "plan_seconds": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    doc = {"model": str(model_dir), "host": platform.processor() or platform.machine(),
           "calibration": f"{args.calib_samples} x {args.calib_seqlen} wiki-calib tokens",
           "eval": f"{args.windows} x 512 held-out wiki tokens; Botchan out of domain", "rows": rows}
    out = HERE / "results"
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# {args.name}", "", f"Model {model_dir.name}; calibration {doc['calibration']}; eval {doc['eval']}.",
             "Same method on both sides; the plan's size is at most the stock file's.", "",
             "| method | stock type | stock MB | plan MB | stock KLD | plan KLD | ratio | stock Botchan KLD | "
             "plan Botchan KLD | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['file_type']} | {r['stock_bytes'] / 1e6:.2f} | {r['plan_bytes'] / 1e6:.2f} | "
                     f"{r['stock_kld']:.4f} | {r['plan_kld']:.4f} | {r['kld_ratio']:.2f}x | {r['stock_ood_kld']:.4f} | "
                     f"{r['plan_ood_kld']:.4f} | {r['ood_ratio']:.2f}x |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
