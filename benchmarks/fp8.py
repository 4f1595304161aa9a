"""FP8 e4m3 (per-row scales, compressed-tensors) on the real model, against FP and lowbit's 8-bit integer grid.

    python benchmarks/fp8.py [--windows 16] [--samples 32 --seqlen 512] [--name fp8]

Each row is a folder lowbit writes (`lowbit quantize --format compressed-tensors --method fp8 ...`), scored by
lowbit's reader and forward against the cached FP reference on held-out Wikipedia and Botchan (16 x 512 tokens
each, as benchmarks/methods.py). The W8A8 row's forward also rounds every linear input to fp8 per token, as
transformers and vLLM run that folder (tests/test_fp8.py checks transformers' logits equal it). bpw = stored
bytes of the decoder linears (codes and scales) over their weights. GPTQ calibration: --samples x --seqlen
tokens of the Wikipedia calibration split.

Writes benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lowbit.eval.compare import EvalSettings, open_session  # noqa: E402
from lowbit.model.default import resolve_model  # noqa: E402

TEXTS = ("wiki", "botchan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--name", default="fp8")
    args = ap.parse_args()

    from lowbit.cli import _calibration
    from lowbit.formats.compressed_tensors import FP8Weights
    from lowbit.formats.hf_export import HFExport, export_checkpoint
    from lowbit.quant.fp8_pipeline import FP8Config, quantize_to_fp8
    from lowbit.quant.methods import parse_config
    from lowbit.quant.pipeline import quantize_checkpoint

    model_dir = resolve_model(None)
    sessions = {t: open_session(model_dir, EvalSettings(t, 512, args.windows)) for t in TEXTS}
    rows = [{"contender": "FP (float32)", "bpw": 32.0, **{t: {"ppl": s.fp_row().ppl, "kld_mean": 0.0,
                                                                 "kld_p99": 0.0, "top1": 1.0}
                                                             for t, s in sessions.items()}}]
    calib = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        contenders = [("fp8 (rtn, float32 scales)", FP8Config()),
                      ("fp8 (rtn, bfloat16 scales)", FP8Config(scale_dtype="bfloat16")),
                      ("fp8 W8A8 dynamic (rtn; activations rounded per token)", FP8Config(activations="dynamic")),
                      ("fp8-gptq (float32 scales)", FP8Config("gptq"))]
        for label, cfg in contenders:
            if cfg.method == "gptq" and calib is None:
                calib = _calibration(model_dir, None, args.samples, args.seqlen, 0, "chunk")
            out = root / f"c{len(rows)}"
            t0 = time.perf_counter()
            summary = quantize_to_fp8(model_dir, cfg, out, calib=calib if cfg.method == "gptq" else None)
            wall = time.perf_counter() - t0
            src = FP8Weights(out)
            rows.append(_score(sessions, src, label, summary["file_bpw"], wall))
            _write(rows, args)
        # context: lowbit's own 8-bit integer grid, per channel, as compressed-tensors W8A16 (pack-quantized)
        t0 = time.perf_counter()
        quantize_checkpoint(model_dir, parse_config("rtn:8:ch"), root / "int8ck")
        ex = export_checkpoint(root / "int8ck", "compressed-tensors", root / "int8ct")
        wall = time.perf_counter() - t0
        src = HFExport(ex)
        rows.append(_score(sessions, src, "int8 rtn:8:ch (compressed-tensors W8A16)", src.meta["file_bpw"], wall))
        _write(rows, args)


def _score(sessions: dict, source, label: str, bpw: float, wall: float) -> dict:
    row = {"contender": label, "bpw": round(bpw, 4), "quantize_s": round(wall, 1)}
    for text, session in sessions.items():
        r = session.score(source, label, bpw, 0, wall)
        row[text] = {"ppl": r.ppl, "kld_mean": r.kld_mean, "kld_p99": r.kld_p99, "top1": r.top1}
    print(json.dumps(row), flush=True)
    return row


def _write(rows: list[dict], args) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"windows": args.windows, "calib": [args.samples, args.seqlen],
                                                       "rows": rows}, indent=2) + "\n")
    fp = rows[0]
    lines = [f"SmolLM2-135M-Instruct (float32), {args.windows} x 512 held-out tokens each of Wikipedia and Botchan; "
             f"GPTQ calibration {args.samples} x {args.seqlen} tokens. `python benchmarks/fp8.py`.", "",
             f"| contender | bpw | wiki KLD | wiki KLD p99 | wiki PPL (FP {fp['wiki']['ppl']:.2f}) | wiki top-1 "
             f"| Botchan KLD | Botchan PPL (FP {fp['botchan']['ppl']:.2f}) | quantize s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        w, b = r["wiki"], r["botchan"]
        lines.append(f"| {r['contender']} | {r['bpw']:.3f} | {w['kld_mean']:.5f} | {w['kld_p99']:.4f} | "
                     f"{w['ppl']:.3f} | {w['top1']:.4f} | {b['kld_mean']:.5f} | {b['ppl']:.3f} | {r['quantize_s']} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
