"""Side-by-side benchmark: lowbit configs and peer quantizers on one model, one text, one run.

Every contender is quantized in its own child process (wall time and peak RSS
from os.wait4) and then scored by the same forward pass and the same KLD code
against one cached FP reference. Writes benchmarks/results/<name>.json and .md.

    python benchmarks/run.py                       # default: RTN vs llama.cpp Q4_0/Q4_K_M/Q8_0
    python benchmarks/run.py --configs rtn:4:128 --llamacpp Q4_K_M --windows 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lowbit.eval.compare import EvalSettings, open_session  # noqa: E402
from lowbit.formats.gguf import GGUFWeights, hf_folder_to_gguf  # noqa: E402
from lowbit.model.default import cache_dir, resolve_model  # noqa: E402
from lowbit.report.table import Row, markdown, with_delta  # noqa: E402


def run_child(python: str, script: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `python script args` in a child process; raises if it fails."""
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("r") as peak:
        cmd = [python, str(HERE / "measure.py"), peak.name, str(script), *args]
        t0 = time.perf_counter()
        code = subprocess.call(cmd, stdout=log, stderr=log)  # a file, not a pipe: a chatty child never blocks
        wall = time.perf_counter() - t0
        if code != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read().decode(errors='replace')[-2000:]}")
        return wall, int(peak.read() or 0) / 1024


def lowbit_row(session, model_dir: Path, config: str, work: Path) -> Row:
    out = work / config.replace(":", "_")
    wall, rss = run_child(sys.executable, HERE / "quantize_one.py", [str(model_dir), config, str(out)])
    row = session.score_checkpoint(out, f"lowbit {config}", wall)
    row.extra.update(tool="lowbit", peak_rss_mib=round(rss, 1))
    return row


def llamacpp_row(session, f32_gguf: Path, qtype: str, work: Path) -> Row:
    out = work / f"llamacpp-{qtype}.gguf"
    wall, rss = run_child(sys.executable, HERE / "peers" / "llamacpp_quantize.py", [str(f32_gguf), str(out), qtype])
    weights = GGUFWeights(out)
    row = session.score(weights, f"llama.cpp {qtype}", weights.linear_bpw(), out.stat().st_size, wall,
                        weights.model_bpw(), tool="llama.cpp", peak_rss_mib=round(rss, 1))
    del weights
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--configs", default="rtn:8:128,rtn:4:128,rtn:4:32,rtn:3:128")
    ap.add_argument("--llamacpp", default="Q8_0,Q4_0,Q4_K_M", help="llama.cpp types, empty to skip")
    ap.add_argument("--eval-text", default="wiki")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--name", default="rtn_vs_llamacpp")
    args = ap.parse_args()

    model_dir = resolve_model(args.model)
    session = open_session(model_dir, EvalSettings(args.eval_text, args.ctx, args.windows))
    rows = [session.fp_row()]
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        work = Path(tmp)
        for cfg in filter(None, args.configs.split(",")):
            rows.append(lowbit_row(session, model_dir, cfg, work))
            print(f"done {cfg}", file=sys.stderr)
        types = [t for t in args.llamacpp.split(",") if t]
        if types:
            f32 = hf_folder_to_gguf(model_dir, work / "model-f32.gguf")
            for qtype in types:
                rows.append(llamacpp_row(session, f32, qtype, work))
                print(f"done llama.cpp {qtype}", file=sys.stderr)
    rows = with_delta(rows)

    results = HERE / "results"
    results.mkdir(exist_ok=True)
    meta = {"model": model_dir.name, "eval_text": session.windows.text_name, "ctx": args.ctx,
            "windows": args.windows, "scored_tokens": session.windows.n_scored, "machine": platform.machine(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    (results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": [r.to_json() for r in rows]},
                                                          indent=2))
    md = [f"# {args.name}", "", f"Model {meta['model']}, text {meta['eval_text']}, ctx {args.ctx}, "
          f"{meta['scored_tokens']} scored tokens, {meta['cpus']} CPUs, {meta['date']}.", "",
          "bpw counts the decoder's linear layers (scales and zeros included); size is the file on disk. "
          "Every row is scored by lowbit's forward pass against the same cached FP reference.", "",
          markdown(rows), "", "| contender | quantize wall s | peak RSS MiB |", "|---|---|---|"]
    md += [f"| {r.config} | {r.seconds:.1f} | {r.extra.get('peak_rss_mib', '')} |" for r in rows[1:]]
    (results / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
