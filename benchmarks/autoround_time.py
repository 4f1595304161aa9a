"""AutoRound's quantize time against the auto-round package, repeated: this 2-core machine's timings move by
10-15% from run to run, so one pair (benchmarks/methods.py --sections autoround) does not settle a ratio near 1.

    python benchmarks/autoround_time.py [--rounds 3] [--iters 50] [--samples 32 --seqlen 128] [--name autoround_time]

Each round runs, one after the other and alone on the machine, auto-round 0.16.1 (W4G128 symmetric, SignRound,
`--iters` iterations, mini-batch 8, in bfloat16: `--amp`, its CPU default) and lowbit `autoround:4:128:iN` (its
default: AWQ equalization, then SignRound; bfloat16 matmuls on a CPU that has them) on the very same calibration
token matrix; the order alternates between rounds. Times are each tool's own clock around its quantization
(auto-round's `quantize()` call; lowbit's pipeline: read, quantize, write) and the whole child process. Quality
is not scored here (methods.py does that); each result's existence is checked. Writes
benchmarks/results/<name>.json and .md: every round, the per-round ratio and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from methods import run_autoround, run_lowbit, write_calib  # noqa: E402

from lowbit.model.default import resolve_model  # noqa: E402


def time_peer(model_dir: Path, calib_npy: Path, out: Path, iters: int) -> dict:
    wall, rss, info = run_autoround(model_dir, calib_npy, out, 4, 128, iters, amp=True)
    return {"quantize_s": info["quantize_wall_s"], "process_s": round(wall, 1), "peak_rss_mib": round(rss, 1)}


def time_lowbit(model_dir: Path, calib_npy: Path, out: Path, iters: int) -> dict:
    wall, rss, own = run_lowbit(model_dir, f"autoround:4:128:i{iters}", out, calib_npy)
    return {"quantize_s": round(own, 1), "process_s": round(wall, 1), "peak_rss_mib": round(rss, 1)}


def write(results: Path, meta: dict, rounds: list[dict]) -> None:
    ratios = [r["lowbit"]["quantize_s"] / r["auto-round"]["quantize_s"] for r in rounds]
    meta = {**meta, "median_ratio": round(statistics.median(ratios), 3) if ratios else None}
    results.with_suffix(".json").write_text(json.dumps({"meta": meta, "rounds": rounds}, indent=1) + "\n")
    lines = [f"# {results.stem}", "", meta["description"], "",
             "| round | first | auto-round bf16 quantize s | lowbit quantize s | lowbit / auto-round | "
             "auto-round process s | lowbit process s | auto-round peak MiB | lowbit peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, (r, q) in enumerate(zip(rounds, ratios), 1):
        a, b = r["auto-round"], r["lowbit"]
        lines.append(f"| {i} | {r['first']} | {a['quantize_s']} | {b['quantize_s']} | {q:.3f}x | {a['process_s']} | "
                     f"{b['process_s']} | {a['peak_rss_mib']} | {b['peak_rss_mib']} |")
    if ratios:
        lines += ["", f"Median lowbit / auto-round quantize time: {meta['median_ratio']:.3f}x "
                      f"(rounds: {', '.join(f'{q:.3f}x' for q in ratios)})."]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--name", default="autoround_time")
    args = ap.parse_args()
    model_dir = resolve_model(None)
    results = HERE / "results" / args.name
    meta = {"description": f"W4G128, {args.iters} iterations, {args.samples} x {args.seqlen} calibration tokens "
                           f"(the same matrix for both), model {model_dir.name}, {args.rounds} alternating rounds "
                           "on 2 CPUs; auto-round in bfloat16 (--amp, its CPU default), lowbit at its default.",
            "iters": args.iters, "samples": args.samples, "seqlen": args.seqlen}
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-artime-") as tmp:
        work = Path(tmp)
        calib_npy, meta["calibration"] = write_calib(model_dir, work, args.samples, args.seqlen)
        for i in range(args.rounds):
            order = ("auto-round", "lowbit") if i % 2 == 0 else ("lowbit", "auto-round")
            row = {"first": order[0]}
            for who in order:
                out = work / f"{who}-{i}"
                timer = time_peer if who == "auto-round" else time_lowbit
                row[who] = timer(model_dir, calib_npy, out, args.iters)
                print(f"round {i + 1} {who}: {row[who]}", file=sys.stderr, flush=True)
            rounds.append(row)
            write(results, meta, rounds)
    print(results.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
