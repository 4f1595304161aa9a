"""GGUF K-quants: lowbit's calibrated files against llama.cpp's own quantizer, with and without an imatrix.

Same model, same calibration token matrix (lowbit's GPTQ/AWQ read it directly;
llama.cpp gets the importance matrix lowbit computes from it, written in
llama.cpp's imatrix GGUF format), the same llama.cpp mix for every file (so
equal type = equal file size), and every row scored by the same forward pass
and KLD code on held-out wiki text and, by the same code, on an out-of-domain
text (Botchan by default; `--ood-text none` skips it). Writes
benchmarks/results/<name>.{json,md}.

    python benchmarks/gguf_kquants.py                                  # Q4_K_M, Q3_K_M, Q2_K
    python benchmarks/gguf_kquants.py --types Q8_0,Q6_K,Q5_K_M --methods gptq
    python benchmarks/gguf_kquants.py --types IQ4_XS,IQ4_NL --samples 32 --methods rtn,gptq,awq-gptq --name gguf_iquants

The file types whose default block type llama.cpp will not write without an importance matrix (IQ2_XXS, IQ2_XS,
IQ2_S, IQ2_M, IQ3_XXS: a default in gguf_mix's IMATRIX_TYPES) get no no-imatrix llama.cpp row, and every lowbit
method is given the imatrix for them.
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
from lowbit.quant.gguf_mix import FILE_TYPES, IMATRIX_TYPES  # noqa: E402
from lowbit.report.table import Row, table_cells, with_delta  # noqa: E402


def ood_summary(ood, row: Row) -> dict:
    """The out-of-domain score of one row, kept under row.extra['ood'] (the schema lowbit run uses)."""
    return {"eval_text": row.eval_text, "ppl": row.ppl, "delta_ppl": row.ppl - ood.ref.summary().ppl,
            "kld_mean": row.kld_mean, "kld_p99": row.kld_p99, "top1": row.top1, "n_tokens": row.n_tokens}


def score_gguf(sessions, path: Path, label: str, wall: float, rss: float, tool: str, file_type: str) -> Row:
    """Score one GGUF file on (wiki, out-of-domain-or-None) sessions; the OOD score goes in row.extra['ood']."""
    wiki, ood = sessions
    weights = GGUFWeights(path)
    row = wiki.score(weights, label, weights.linear_bpw(), path.stat().st_size, wall, weights.model_bpw(),
                     tool=tool, file_type=file_type, peak_rss_mib=round(rss, 1))
    msg = f"{label}: KLD {row.kld_mean:.4f}"
    if ood is not None:
        o = ood.score(weights, label, row.bpw, row.size_bytes, wall)
        row.extra["ood"] = ood_summary(ood, o)
        msg += f", {o.eval_text} KLD {o.kld_mean:.4f}"
    print(f"{msg}, {wall:.1f} s", file=sys.stderr, flush=True)
    return row


def text_label(text_name: str) -> str:
    """'botchan.txt' -> 'Botchan'."""
    return Path(text_name).stem.removesuffix("_eval").capitalize()


def markdown_table(rows: list[Row]) -> str:
    """lowbit's table with the out-of-domain PPL and KLD as two columns after top-1."""
    head, body = table_cells([r.to_json() for r in rows])
    if "OOD KLD" in head:
        i = head.index("OOD KLD")
        name = next(r.extra["ood"]["eval_text"] for r in rows if r.extra.get("ood"))
        name = text_label(name)
        head[i:i + 1] = [f"{name} PPL", f"{name} KLD"]
        for r, cells in zip(rows, body):
            o = r.extra.get("ood")
            cells[i:i + 1] = [f"{o['ppl']:.3f}", f"{o['kld_mean']:.4f}"] if o else ["-", "-"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c) + " |" for c in body]
    return "\n".join(lines) + "\n"


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
    label = f"lowbit {file_type} {method}{' +imatrix' if imatrix else ''}"
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
          f"{meta['ctx']}"
          + (f", and {meta['ood_scored_tokens']} tokens of the out-of-domain text {meta['ood_text']} scored the "
             f"same way" if meta.get("ood_text") else "")
          + f"; {meta['cpus']} CPUs; {meta['date']}.", "",
          "Every file has llama.cpp's mix for its type (same tensors, same types, same size; for some types "
          "the mix depends on whether an imatrix is given, which size MB shows). bpw counts the "
          "decoder's linear layers; size is the whole file. All rows are scored by lowbit's forward pass on "
          "the exact dequantization of each file.", "", markdown_table(rows), ""]
    ood = bool(meta.get("ood_text"))
    md += ["| file type | best lowbit | its KLD / llama.cpp+imatrix KLD |"
           + (f" {text_label(meta['ood_text'])} (out of domain): its KLD / llama.cpp+imatrix KLD |" if ood else "")
           + " quantize wall s: lowbit / llama.cpp+imatrix |",
           "|---|---|---|---|" + ("---|" if ood else "")]
    for ft in meta["types"]:
        peer = next((r for r in rows if r.config == f"llama.cpp {ft} +imatrix"), None)
        mine = [r for r in rows if r.config.startswith(f"lowbit {ft} ") and "rtn" not in r.config]
        if peer and mine:
            best = min(mine, key=lambda r: r.kld_mean)
            ood_cell = ""
            if ood:
                b, p = best.extra.get("ood"), peer.extra.get("ood")
                ood_cell = f" {b['kld_mean'] / p['kld_mean']:.2f}x |" if b and p else " - |"
            md.append(f"| {ft} | {best.config} | {best.kld_mean / peer.kld_mean:.2f}x |{ood_cell} "
                      f"{best.seconds:.1f} / {peer.seconds:.1f} |")
    (results / f"{args.name}.md").write_text("\n".join(md) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--methods", default="rtn,gptq,awq",
                    help="lowbit methods (rtn uses the imatrix; METHOD+imatrix gives it to another method too, "
                         "and with it llama.cpp's imatrix mix)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ood-text", default="botchan",
                    help="out-of-domain text every row is also scored on ('none' to skip)")
    ap.add_argument("--name", default="gguf_kquants")
    args = ap.parse_args()

    model_dir = resolve_model(args.model)
    calib = build_calibration(load_tokenizer(model_dir), default_calib_text(),
                              CalibConfig(args.samples, args.seqlen, seed=0), 8192)
    wiki = open_session(model_dir, EvalSettings("wiki", args.ctx, args.windows))
    ood = None if args.ood_text == "none" else open_session(model_dir, EvalSettings(args.ood_text, args.ctx,
                                                                                    args.windows))
    session = (wiki, ood)
    types = [t for t in args.types.split(",") if t]
    meta = {"model": model_dir.name, "calibration": calib.summary, "eval_text": wiki.windows.text_name,
            "ctx": args.ctx, "windows": args.windows, "scored_tokens": wiki.windows.n_scored,
            "ood_text": ood.windows.text_name if ood else None,
            "ood_scored_tokens": ood.windows.n_scored if ood else 0,
            "machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "types": types}
    rows = [wiki.fp_row()]
    if ood is not None:
        fp = ood.fp_row()
        rows[0].extra["ood"] = ood_summary(ood, fp)
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
            needs_imatrix = FILE_TYPES[ft][0] in IMATRIX_TYPES  # llama.cpp (and lowbit) refuse these without one
            if not needs_imatrix:
                rows.append(llamacpp_row(session, f32, ft, None, work))
            rows.append(llamacpp_row(session, f32, ft, imatrix, work))
            for spec in filter(None, args.methods.split(",")):
                method, _, flag = spec.partition("+")  # gptq+imatrix: the imatrix also reaches a calibrated method
                use = method == "rtn" or flag == "imatrix" or needs_imatrix
                rows.append(lowbit_row(session, model_dir, ft, method, calib_npy, imatrix if use else None, work))
                write_results(args, meta, rows)
    write_results(args, meta, rows)
    print((HERE / "results" / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
