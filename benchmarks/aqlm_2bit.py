"""AQLM 2x8 at about 2 bits per weight against lowbit GPTQ 2-bit g64 and llama.cpp's Q2_K with an imatrix.

    python benchmarks/aqlm_2bit.py [--keep DIR] [--samples 64] [--seqlen 512] [--windows 16]

One calibration set (the Wikipedia calibration split, seed 0) feeds every contender: AQLM's Hessians, GPTQ's,
and the importance matrix of Q2_K (llama.cpp's own quantizer, which lowbit reproduces bit for bit). Each artifact
is written to disk and scored from disk by lowbit's forward against one FP reference per text, on held-out
Wikipedia and on Botchan (out of domain). bpw counts the same thing for every row: the stored bytes of the
decoder linears (codes, scales, zero points; AQLM's codebooks too) over their weights; the embedding is not
counted (the model's is tied and stays float in every row).

Artifacts already in --keep are reused, with the build seconds recorded in DIR/seconds.json when they were
built (so the slow AQLM build need not be repeated to re-score). Writes benchmarks/results/<name>.json, .md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import sys

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lowbit.calib.dataset import CalibConfig, build_calibration  # noqa: E402
from lowbit.calib.text import default_calib_text  # noqa: E402
from lowbit.eval.compare import EvalSettings, open_session  # noqa: E402
from lowbit.eval.data import load_tokenizer  # noqa: E402
from lowbit.model.default import resolve_model  # noqa: E402
from lowbit.pipeline.candidates import BuildContext, build_candidate, parse_candidate  # noqa: E402

CONFIGS = "aqlm:2x8,gptq:2:64:asym,gguf:Q2_K:imatrix"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--name", default="aqlm_2bit")
    a = ap.parse_args()
    model_dir = resolve_model(None)
    keep = a.keep or Path(os.environ.get("TMPDIR", "/tmp")) / "lowbit-aqlm-2bit"
    keep.mkdir(parents=True, exist_ok=True)
    seconds_file = keep / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    calib = build_calibration(load_tokenizer(model_dir), default_calib_text(), CalibConfig(a.samples, a.seqlen, seed=0))
    ctx = BuildContext(model_dir, calib)
    sessions = {t: open_session(model_dir, EvalSettings(eval_text=t, ctx=512, windows=a.windows))
                for t in ("wiki", "botchan")}
    rows = []
    for text in a.configs.split(","):
        cand = parse_candidate(text)
        out = keep / cand.file_name
        if not out.exists():
            t0 = time.perf_counter()
            build_candidate(cand, ctx, out)
            seconds[text] = round(time.perf_counter() - t0, 1)
            seconds_file.write_text(json.dumps(seconds, indent=2) + "\n")
        row = {"contender": text, "quantize_s": seconds.get(text)}
        for t, session in sessions.items():
            r = session.score_artifact(out, config=text)
            row["bpw"] = round(r.bpw, 4)
            row[t] = {"ppl": r.ppl, "kld_mean": r.kld_mean, "kld_p99": r.kld_p99, "top1": r.top1}
        rows.append(row)
        print(json.dumps(row), flush=True)
    fp = {t: s.fp_row().ppl for t, s in sessions.items()}
    meta = {"model": str(model_dir), "windows": a.windows, "calibration": f"{a.samples} x {a.seqlen} wiki, seed 0",
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "fp_ppl": fp}
    res = HERE / "results" / a.name
    res.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = [f"# {a.name}", "", f"Model {model_dir}; {a.windows} windows x 512 tokens of held-out Wikipedia and of "
          f"Botchan; calibration {meta['calibration']}; {meta['cpus']} CPUs; {meta['date']}. FP PPL wiki "
          f"{fp['wiki']:.3f}, Botchan {fp['botchan']:.3f}. bpw: stored bytes of the decoder linears over their "
          "weights (codebooks, scales and zero points included).", "",
          "| contender | bpw | wiki KLD | wiki p99 | wiki top-1 | wiki PPL | Botchan KLD | Botchan top-1 | Botchan PPL "
          "| quantize s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w, b = r["wiki"], r["botchan"]
        md.append(f"| {r['contender']} | {r['bpw']:.3f} | {w['kld_mean']:.4f} | {w['kld_p99']:.3f} | {w['top1']:.4f} "
                  f"| {w['ppl']:.2f} | {b['kld_mean']:.4f} | {b['top1']:.4f} | {b['ppl']:.2f} | {r['quantize_s']} |")
    md += ["", "A GGUF row's bpw is what llama.cpp's mix writes for this model: on SmolLM2 every 576-wide tensor falls "
           "back from Q2_K to Q4_0 (llama.cpp's rule for rows that are not a multiple of 256), so its Q2_K is not a "
           "2-bit file. Quantize times come from one run each on 2 shared cores (other benchmarks ran beside them)."]
    res.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
