"""GGUF K-quants: lowbit's calibrated files against llama.cpp's own quantizer, with and without an imatrix.

Same model, same calibration token matrix (lowbit's GPTQ/AWQ read it directly;
llama.cpp gets the importance matrix lowbit computes from it, written in
llama.cpp's imatrix GGUF format), the same llama.cpp mix for every file (so
equal type = equal file size), and every row scored by the same forward pass
and KLD code on held-out text. Writes benchmarks/results/<name>.{json,md}.

    python benchmarks/gguf_kquants.py                                  # Q4_K_M, Q3_K_M, Q2_K
    python benchmarks/gguf_kquants.py --types Q8_0,Q6_K,Q5_K_M --methods gptq
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from run import run_child  # noqa: E402

from lowbit.calib.dataset import CalibConfig, build_calibration  # noqa: E402
from lowbit.calib.imatrix import compute_imatrix  # noqa: E402
from lowbit.calib.text import default_calib_text  # noqa: E402
from lowbit.eval.compare import EvalSettings, open_session  # noqa: E402
from lowbit.eval.data import load_tokenizer  # noqa: E402
from lowbit.formats.gguf import GGUFWeights, hf_folder_to_gguf  # noqa: E402
from lowbit.formats.imatrix import write_imatrix_gguf  # noqa: E402
from lowbit.model.default import cache_dir, resolve_model  # noqa: E402
from lowbit.report.table import Row, markdown, with_delta  # noqa: E402


def score_gguf(session, path: Path, label: str, wall: float, rss: float, tool: str, file_type: str) -> Row:
    weights = GGUFWeights(path)
    row = session.score(weights, label, weights.linear_bpw(), path.stat().st_size, wall, weights.model_bpw(),
                        tool=tool, file_type=file_type, peak_rss_mib=round(rss, 1))
    print(f"{label}: KLD {row.kld_mean:.4f}, {wall:.1f} s", file=sys.stderr, flush=True)
    return row


def llamacpp_row(session, f32: Path, file_type: str, imatrix: Path | None, work: Path) -> Row:
    out = work / f"llamacpp-{file_type}{'-imatrix' if imatrix else ''}.gguf"
    args = [str(f32), str(out), file_type] + ([str(imatrix)] if imatrix else [])
    wall, rss = run_child(sys.executable, HERE / "peers" / "llamacpp_quantize.py", args)
    return score_gguf(session, out, f"llama.cpp {file_type}{' +imatrix' if imatrix else ''}", wall, rss,
                      "llama.cpp", file_type)


def lowbit_row(session, model_dir: Path, file_type: str, method: str, calib_npy: Path, imatrix: Path | None,
               work: Path) -> Row:
    out = work / f"lowbit-{file_type}-{method}.gguf"
    args = [str(model_dir), f"gguf:{file_type}:{method}", str(out), str(calib_npy)] + ([str(imatrix)] if imatrix
                                                                                       else [])
    wall, rss = run_child(sys.executable, HERE / "quantize_one.py", args)
    label = f"lowbit {file_type} {method}{' +imatrix' if imatrix and method == 'rtn' else ''}"
    return score_gguf(session, out, label, wall, rss, "lowbit", file_type)


def write_results(args, meta: dict, rows: list[Row]) -> None:
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    rows = with_delta(rows)
    (results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": [r.to_json() for r in rows]},
                                                          indent=2))
    md = [f"# {args.name}", "",
          f"Model {meta['model']}; calibration {meta['calibration']['samples']} x {meta['calibration']['seqlen']} "
          f"tokens of the Wikipedia calibration split (lowbit's GPTQ/AWQ use it directly, llama.cpp through the "
          f"imatrix lowbit computes from it); evaluation {meta['scored_tokens']} held-out tokens at ctx "
          f"{meta['ctx']}; {meta['cpus']} CPUs; {meta['date']}.", "",
          "Every file has llama.cpp's mix for its type (same tensors, same types, same size). bpw counts the "
          "decoder's linear layers; size is the whole file. All rows are scored by lowbit's forward pass on "
          "the exact dequantization of each file.", "", markdown(rows), "",
          "| file type | best lowbit | its KLD / llama.cpp+imatrix KLD | quantize wall s: lowbit / llama.cpp+imatrix |",
          "|---|---|---|---|"]
    for ft in meta["types"]:
        peer = next((r for r in rows if r.config == f"llama.cpp {ft} +imatrix"), None)
        mine = [r for r in rows if r.config.startswith(f"lowbit {ft} ") and "rtn" not in r.config]
        if peer and mine:
            best = min(mine, key=lambda r: r.kld_mean)
            md.append(f"| {ft} | {best.config} | {best.kld_mean / peer.kld_mean:.2f}x | "
                      f"{best.seconds:.1f} / {peer.seconds:.1f} |")
    (results / f"{args.name}.md").write_text("\n".join(md) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--methods", default="rtn,gptq,awq", help="lowbit methods (rtn uses the imatrix)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--name", default="gguf_kquants")
    args = ap.parse_args()

    model_dir = resolve_model(args.model)
    calib = build_calibration(load_tokenizer(model_dir), default_calib_text(),
                              CalibConfig(args.samples, args.seqlen, seed=0), 8192)
    session = open_session(model_dir, EvalSettings("wiki", args.ctx, args.windows))
    types = [t for t in args.types.split(",") if t]
    meta = {"model": model_dir.name, "calibration": calib.summary, "eval_text": session.windows.text_name,
            "ctx": args.ctx, "windows": args.windows, "scored_tokens": session.windows.n_scored,
            "machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "types": types}
    rows = [session.fp_row()]
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        work = Path(tmp)
        calib_npy = work / "calib.npy"
        np.save(calib_npy, calib.tokens.numpy())
        t0 = time.perf_counter()
        imatrix = work / "imatrix.gguf"
        write_imatrix_gguf(imatrix, compute_imatrix(model_dir, calib), ["wiki-calib"], calib.tokens.shape[0],
                           calib.tokens.shape[1])
        meta["imatrix_seconds"] = round(time.perf_counter() - t0, 1)
        f32 = hf_folder_to_gguf(model_dir, work / "model-f32.gguf")
        for ft in types:
            rows.append(llamacpp_row(session, f32, ft, None, work))
            rows.append(llamacpp_row(session, f32, ft, imatrix, work))
            for method in filter(None, args.methods.split(",")):
                rows.append(lowbit_row(session, model_dir, ft, method, calib_npy,
                                       imatrix if method == "rtn" else None, work))
                write_results(args, meta, rows)
    write_results(args, meta, rows)
    print((HERE / "results" / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
