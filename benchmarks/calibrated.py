"""Calibrated 4-bit g128 side by side: lowbit GPTQ/AWQ vs llm-compressor and gptqmodel.

One model, one calibration token matrix (given to every tool as the same .npy),
one held-out evaluation text. Every contender quantizes in its own process
(wall time and peak RSS measured there) and is scored by lowbit's forward
pass and KLD code against one cached FP reference. Peers run in their own
venvs (benchmarks/peers/setup_peer_venvs.sh creates them) and hand back their
weights dequantized to float32 in a plain HF folder.

    python benchmarks/calibrated.py [--samples 64 --seqlen 512] [--peers llmcompressor,gptqmodel]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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
from lowbit.calib.text import default_calib_text  # noqa: E402
from lowbit.eval.compare import EvalSettings, open_session  # noqa: E402
from lowbit.eval.data import load_tokenizer  # noqa: E402
from lowbit.model.default import cache_dir, resolve_model  # noqa: E402
from lowbit.model.forward import FolderWeights  # noqa: E402
from lowbit.model.hf import ModelFolder  # noqa: E402
from lowbit.report.table import markdown, with_delta  # noqa: E402

PEER_VENVS = HERE / ".venvs"
# (method, group size): gptqmodel's AWQ refuses 576-wide layers at g128 (its scale search assumes
# divisibility), so it runs at g64 and is compared with lowbit awq:4:64.
PEER_METHODS = {"llmcompressor": (("gptq", 128), ("awq", 128)), "gptqmodel": (("gptq", 128), ("awq", 64))}


def peer_bpw(info: dict, folder: ModelFolder) -> float:
    """Bits per weight of a peer's symmetric checkpoint from the group size it used per layer (fp16 scales)."""
    import re

    per_layer = info.get("group_size_per_layer") or {}
    bits = numel = 0
    for group, patterns in per_layer.items():
        for pattern in patterns:
            regex = re.escape(pattern).replace(r"\{0\-29\}", r"\d+")
            for name in folder.names():
                if re.fullmatch(regex + r"\.weight", name):
                    out, n_in = folder.shape(name)
                    bits += out * n_in * 4 + out * -(-n_in // int(group)) * 16
                    numel += out * n_in
    return bits / numel if numel else float("nan")


def ensure_peer_venv(tool: str) -> Path:
    python = PEER_VENVS / tool / "bin" / "python"
    if not python.exists():
        subprocess.run(["bash", str(HERE / "peers" / "setup_peer_venvs.sh"), tool], check=True)
    return python


def peer_row(session, tool: str, method: str, group: int, model_dir: Path, calib_npy: Path, work: Path):
    out = work / f"{tool}-{method}-{group}"
    python = ensure_peer_venv(tool)
    env_args = ["--model", str(model_dir), "--method", method, "--calib-tokens", str(calib_npy), "--out", str(out),
                "--bits", "4", "--group-size", str(group)]
    wall, rss = run_child(str(python), HERE / "peers" / f"{tool}_quantize.py", env_args)
    info = json.loads((out / "peer.json").read_text())
    weights = FolderWeights(ModelFolder(out / "dequantized"))
    row = session.score(weights, f"{tool} {method}:4:{group}", peer_bpw(info, session.folder), 0,
                        info.get("quantize_wall_s", wall), tool=tool,
                        version=(info.get("versions") or {}).get(tool.replace("llmcompressor", "llmcompressor")),
                        process_seconds=round(wall, 1), peak_rss_mib=round(rss, 1),
                        unquantized=info.get("unquantized_layers", []),
                        group_size_per_layer=info.get("group_size_per_layer"))
    native = out / "native"
    row.size_bytes = sum(f.stat().st_size for f in native.rglob("*.safetensors")) if native.exists() else 0
    return row


def lowbit_row(session, config: str, model_dir: Path, calib_npy: Path, work: Path):
    out = work / config.replace(":", "_")
    wall, rss = run_child(sys.executable, HERE / "quantize_one.py", [str(model_dir), config, str(out), str(calib_npy)])
    row = session.score_checkpoint(out, f"lowbit {config}", wall)
    row.extra.update(tool="lowbit", peak_rss_mib=round(rss, 1))
    return row


def write_results(results: Path, args, model_dir: Path, calib, session, rows) -> None:
    """Write the JSON and markdown now: called after every row, so a killed run keeps what it measured."""
    rows = with_delta(rows)
    meta = {"model": model_dir.name, "calibration": calib.summary, "eval_text": session.windows.text_name,
            "scored_tokens": session.windows.n_scored, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    (results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": [r.to_json() for r in rows]},
                                                          indent=2))
    md = [f"# {args.name}", "",
          f"Model {meta['model']}; calibration {args.samples} x {args.seqlen} tokens of the Wikipedia calibration "
          f"split (identical token matrix for every tool); evaluation {meta['scored_tokens']} tokens of held-out "
          f"Wikipedia at ctx 512; {meta['cpus']} CPUs; {meta['date']}. All rows scored by lowbit's forward pass.",
          "", markdown(rows), "", "| contender | quantize s (tool's call) | whole process s | peak RSS MiB | notes |",
          "|---|---|---|---|---|"]
    for r in rows[1:]:
        notes = ", ".join(f"{k}={v}" for k, v in r.extra.items() if k in ("version", "unquantized") and v)
        process = r.extra.get("process_seconds", round(r.seconds, 1))
        md.append(f"| {r.config} | {r.seconds:.1f} | {process} | {r.extra.get('peak_rss_mib', '')} | {notes} |")
    (results / f"{args.name}.md").write_text("\n".join(md) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--configs", default="rtn:4:128,gptq:4:128,gptq:4:128:act,awq:4:128,awq:4:64")
    ap.add_argument("--peers", default="llmcompressor,gptqmodel")
    ap.add_argument("--peer-methods", default="gptq,awq", help="which peer methods to run")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--name", default="calibrated_w4g128")
    args = ap.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    calib = build_calibration(tok, default_calib_text(), CalibConfig(args.samples, args.seqlen, seed=0))
    session = open_session(model_dir, EvalSettings("wiki", 512, args.windows))
    rows = [session.fp_row()]
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        work = Path(tmp)
        calib_npy = work / "calib.npy"
        np.save(calib_npy, calib.tokens.numpy())
        for cfg in filter(None, args.configs.split(",")):
            rows.append(lowbit_row(session, cfg, model_dir, calib_npy, work))
            write_results(results, args, model_dir, calib, session, rows)
            print(f"done lowbit {cfg}", file=sys.stderr, flush=True)
        for tool in filter(None, args.peers.split(",")):
            for method, group in PEER_METHODS[tool]:
                if method not in args.peer_methods.split(","):
                    continue
                try:
                    rows.append(peer_row(session, tool, method, group, model_dir, calib_npy, work))
                    write_results(results, args, model_dir, calib, session, rows)
                except Exception as exc:  # a peer that fails is reported, not fatal to the run
                    print(f"{tool} {method} failed: {exc}", file=sys.stderr, flush=True)
                    (results / f"{args.name}.{tool}-{method}.error.txt").write_text(str(exc)[-5000:])
                print(f"done {tool} {method}", file=sys.stderr, flush=True)
    write_results(results, args, model_dir, calib, session, rows)
    print((results / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
