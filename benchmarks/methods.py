"""The seeds' other methods side by side with their reference packages: one model, one run, two texts.

    python benchmarks/methods.py [--sections hqq,bnb,autoround] [--bits 4,3,2] [--group 64] [--windows 16]
        [--samples 64 --seqlen 512] [--iters 50] [--name methods]

Each contender quantizes in its own process (wall time and peak RSS measured there); every row is scored by
lowbit's forward pass and KLD code against the same cached FP reference, on held-out Wikipedia and on Botchan
(out of domain). Peers run in their own venvs (benchmarks/peers/setup_peer_venvs.sh NAME) and hand back
dequantized float32 weights. Sections:

  * hqq: lowbit `hqq:B:G:asym` (integer zeros, exportable to every format), `hqq:B:G:asym:fzero` (float16
    zeros as the package keeps them; lowbit and MLX files) and `rtn:B:G:asym` against the hqq package
    (float zeros, its own pickle format only), B in --bits.
  * bnb: lowbit's bitsandbytes folders (NF4 + double quant and LLM.int8; rtn = bitsandbytes' own rounding,
    gptq = codes chosen by GPTQ, natural and act-order) against bitsandbytes quantizing on load in
    transformers. Both are bitsandbytes files; lowbit's reader scores them (its dequantization is checked
    bit for bit against bitsandbytes' in tests/test_consumers_methods.py). Calibration: --samples x --seqlen
    tokens of the Wikipedia calibration split.
  * autoround: lowbit `autoround:4:128:iN` (AWQ equalization, then SignRound; bfloat16 matmuls on a CPU
    with AVX512-BF16/AMX, as auto-round's CPU default), `...:fp32` (float32 matmuls), `...:r2` (each block
    learned twice, the lower calibration error kept) and `...:plain` (SignRound alone: auto-round's recipe)
    against the auto-round package twice, in bfloat16 (`--amp`, its CPU default) and in float32 (SignRound,
    W4G128 symmetric, the same N = --iters iterations, mini-batch 8, and the very same --samples x --seqlen
    calibration tokens: the token matrix lowbit draws is handed to auto-round as ready token ids), with
    lowbit rtn:4:128 and gptq:4:128 for context; then, for the other B in --bits at group --group, lowbit
    `autoround:B:G:iN` against lowbit `gptq:B:G` (and rtn). auto-round runs torch.compile at its default;
    its row's "quantize s" is its own `quantize()` call, and
    process_s the whole child process (load, quantize, writing the weights). lowbit's "quantize s" is its
    pipeline's own clock (read layers, quantize, write the checkpoint), process_s its whole process.

Writes benchmarks/results/<name>.json and .md, rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from calibrated import ensure_peer_venv  # noqa: E402
from run import run_child  # noqa: E402

from lowbit.eval.compare import EvalSettings, open_session  # noqa: E402
from lowbit.model.default import cache_dir, resolve_model  # noqa: E402
from lowbit.model.forward import FolderWeights  # noqa: E402
from lowbit.model.hf import ModelFolder  # noqa: E402

TEXTS = ("wiki", "botchan")


def score_all(sessions: dict, source, label: str, bpw: float, size: int, wall: float, rss: float, **extra) -> dict:
    row = {"contender": label, "bpw": round(bpw, 4), "size_bytes": size, "quantize_s": round(wall, 1),
           "peak_rss_mib": round(rss, 1), **extra}
    for text, session in sessions.items():
        r = session.score(source, label, bpw, size, wall)
        row[text] = {"ppl": r.ppl, "kld_mean": r.kld_mean, "kld_p99": r.kld_p99, "top1": r.top1}
    return row


def run_lowbit(model_dir: Path, config: str, out: Path, calib_npy: Path | None = None) -> tuple[float, float, float]:
    """lowbit quantizing alone in a child process: (process wall s, peak RSS MiB, its pipeline's own s)."""
    wall, rss = run_child(sys.executable, HERE / "quantize_one.py",
                          [str(model_dir), config, str(out)] + ([str(calib_npy)] if calib_npy else []))
    return wall, rss, json.loads(Path(f"{out}.seconds.json").read_text())["quantize_s"]


def lowbit_row(sessions: dict, model_dir: Path, config: str, work: Path, calib_npy: Path | None = None) -> dict:
    from lowbit.formats.lowbit_ckpt import LowbitCheckpoint

    out = work / config.replace(":", "_")
    wall, rss, own = run_lowbit(model_dir, config, out, calib_npy)
    ck = LowbitCheckpoint(out)
    return score_all(sessions, ck, f"lowbit {config}", ck.meta["stats"]["bpw"], ck.size_bytes(), own, rss,
                     tool="lowbit", process_s=round(wall, 1))


def hqq_peer_row(sessions: dict, model_dir: Path, bits: int, group: int, work: Path) -> dict:
    out = work / f"hqq-{bits}-{group}"
    wall, rss = run_child(str(ensure_peer_venv("hqq")), HERE / "peers" / "hqq_quantize.py",
                          ["--model", str(model_dir), "--out", str(out), "--bits", str(bits),
                           "--group-size", str(group)])
    info = json.loads((out / "peer.json").read_text())
    bpw = bits + 2 * 16 / group  # hqq keeps a 16-bit scale and a 16-bit float zero per group
    return score_all(sessions, FolderWeights(ModelFolder(out / "dequantized")), f"hqq {bits}:{group}", bpw, 0,
                     info["quantize_wall_s"], rss, tool="hqq", version=info["versions"]["hqq"],
                     process_s=round(wall, 1))


def lowbit_bnb_row(sessions: dict, model_dir: Path, config: str, work: Path, calib_npy: Path) -> dict:
    from lowbit.formats.bnb import BnbWeights

    out = work / config.replace(":", "_")
    wall, rss = run_child(sys.executable, HERE / "quantize_one.py", [str(model_dir), config, str(out), str(calib_npy)])
    meta = json.loads((out / "lowbit_export.json").read_text())
    return score_all(sessions, BnbWeights(out), f"lowbit {config}", meta["file_bpw"],
                     sum(f.stat().st_size for f in out.glob("*.safetensors")), wall, rss, tool="lowbit")


def bnb_peer_row(sessions: dict, model_dir: Path, kind: str, work: Path) -> dict:
    from lowbit.formats.bnb import BnbWeights

    out = work / f"bnb-{kind}"
    wall, rss = run_child(str(ensure_peer_venv("bnb")), HERE / "peers" / "bnb_quantize.py",
                          ["--model", str(model_dir), "--out", str(out), "--kind", kind])
    info = json.loads((out / "peer.json").read_text())
    bpw = 4 + 8 / 64 + 32 / (64 * 256) if kind == "nf4" else 8 + 32 / 576  # codes + absmax (+ nested) / SCB
    return score_all(sessions, BnbWeights(out / "native"), f"bitsandbytes {kind}", bpw,
                     sum(f.stat().st_size for f in (out / "native").glob("*.safetensors")), info["quantize_wall_s"],
                     rss, tool="bitsandbytes", version=info["versions"]["bitsandbytes"], process_s=round(wall, 1))


def run_autoround(model_dir: Path, calib_npy: Path, out: Path, bits: int, group: int, iters: int,
                  amp: bool) -> tuple[float, float, dict]:
    """The auto-round package alone in its venv: (process wall s, peak RSS MiB, its peer.json)."""
    wall, rss = run_child(str(ensure_peer_venv("autoround")), HERE / "peers" / "autoround_quantize.py",
                          ["--model", str(model_dir), "--calib-tokens", str(calib_npy), "--out", str(out),
                           "--bits", str(bits), "--group-size", str(group), "--iters", str(iters)]
                          + (["--amp"] if amp else []))
    return wall, rss, json.loads((out / "peer.json").read_text())


def autoround_peer_row(sessions: dict, model_dir: Path, bits: int, group: int, iters: int, work: Path,
                       calib_npy: Path, amp: bool) -> dict:
    """auto-round in bfloat16 (`amp`: its CPU default) or float32."""
    out = work / f"autoround-{bits}-{group}-i{iters}-{'bf16' if amp else 'fp32'}"
    wall, rss, info = run_autoround(model_dir, calib_npy, out, bits, group, iters, amp)
    if info["unquantized_layers"]:
        raise RuntimeError(f"auto-round left decoder linears off its grid: {info['unquantized_layers'][:5]}")
    return score_all(sessions, FolderWeights(ModelFolder(out / "dequantized")),
                     f"auto-round {bits}:{group}:i{iters} {'bf16' if amp else 'fp32'}", info["bpw"], 0,
                     info["quantize_wall_s"], rss,
                     tool="auto-round", version=info["versions"]["auto-round"], process_s=round(wall, 1),
                     settings=info["settings"], grid=info["grid"])


def write_calib(model_dir: Path, work: Path, samples: int, seqlen: int) -> tuple[Path, dict]:
    """lowbit's calibration matrix (Wikipedia calibration split, seed 0) as the .npy every contender reads."""
    import numpy as np

    from lowbit.calib.dataset import CalibConfig, build_calibration
    from lowbit.calib.text import default_calib_text
    from lowbit.eval.data import load_tokenizer

    calib = build_calibration(load_tokenizer(model_dir), default_calib_text(), CalibConfig(samples, seqlen, seed=0))
    calib_npy = work / "calib.npy"
    np.save(calib_npy, calib.tokens.numpy())
    return calib_npy, calib.summary


def autoround_notes(rows: list[dict], bits: list[int], group: int, iters: int) -> str:
    """The issue's acceptance figures, read off the rows: lowbit / auto-round at W4G128, autoround vs gptq below."""
    by = {r["contender"]: r for r in rows}
    out = []
    pairs = [(flag, precision) for flag in ("", ":r2", ":plain") for precision in ("bf16", "fp32")]
    pairs.append((":fp32", "fp32"))  # like for like in float32
    for flag, precision in pairs:
        ours, peer = by.get(f"lowbit autoround:4:128:i{iters}{flag}"), by.get(f"auto-round 4:128:i{iters} {precision}")
        if peer and ours:
            k = " / ".join(f"{t} {ours[t]['kld_mean'] / peer[t]['kld_mean']:.3f}x" for t in TEXTS)
            out.append(f"- W4G128, {iters} iterations: lowbit autoround{flag} / auto-round {precision} KLD {k}; time "
                       f"{ours['quantize_s']} s vs {peer['process_s']} s whole process "
                       f"({ours['quantize_s'] / peer['process_s']:.2f}x), vs {peer['quantize_s']} s auto-round "
                       f"quantize() alone ({ours['quantize_s'] / peer['quantize_s']:.2f}x).")
    for b in bits:
        g = 128 if b == 4 else group
        ar, gq = by.get(f"lowbit autoround:{b}:{g}:i{iters}"), by.get(f"lowbit gptq:{b}:{g}")
        if ar and gq:
            k = " / ".join(f"{t} {ar[t]['kld_mean']:.4f} vs {gq[t]['kld_mean']:.4f} "
                           f"({ar[t]['kld_mean'] / gq[t]['kld_mean']:.2f}x)" for t in TEXTS)
            out.append(f"- {b}-bit g{g}: lowbit autoround vs lowbit gptq KLD {k}.")
    return "\n".join(out) + "\n" if out else ""


def hqq_notes(rows: list[dict], bits: list[int], group: int) -> str:
    """The acceptance figures: each lowbit HQQ row / the hqq package at the same bits and group, KLD and time."""
    by = {r["contender"]: r for r in rows}
    out = []
    for b in bits:
        peer = by.get(f"hqq {b}:{group}")
        for cfg in (f"hqq:{b}:{group}:asym:fzero", f"hqq:{b}:{group}:asym"):
            ours = by.get(f"lowbit {cfg}")
            if peer and ours:
                k = " / ".join(f"{t} {ours[t]['kld_mean']:.4f} vs {peer[t]['kld_mean']:.4f} "
                               f"({ours[t]['kld_mean'] / peer[t]['kld_mean']:.2f}x)" for t in TEXTS)
                out.append(f"- {cfg} ({ours['bpw']:.3f} bpw) / hqq {b}:{group} ({peer['bpw']:.3f} bpw): KLD {k}; "
                           f"quantize {ours['quantize_s']} s vs {peer['quantize_s']} s "
                           f"({ours['quantize_s'] / peer['quantize_s']:.2f}x), whole process {ours['process_s']} s "
                           f"vs {peer['process_s']} s ({ours['process_s'] / peer['process_s']:.2f}x).")
    return "\n".join(out) + "\n" if out else ""


def write_results(path: Path, meta: dict, rows: list[dict]) -> None:
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = [f"# {path.stem}", "",
          f"Model {meta['model']}; {meta['windows']} windows x 512 tokens of held-out Wikipedia and of Botchan "
          f"(out of domain); {meta['cpus']} CPUs; {meta['date']}. Every row scored by lowbit's forward pass "
          "against one FP reference per text. bpw counts codes, scales and zero points of the quantized linears. "
          "quantize s: the tool's own clock around its quantization (lowbit: read, quantize, write; peers: their "
          "quantize call); process s: the whole child process (imports, load, write).",
          "", "| contender | bpw | wiki KLD | wiki p99 | wiki top-1 | wiki PPL | Botchan KLD | Botchan top-1 | "
          "quantize s | process s | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w, b = r["wiki"], r["botchan"]
        md.append(f"| {r['contender']} | {r['bpw']:.3f} | {w['kld_mean']:.4f} | {w['kld_p99']:.3f} | "
                  f"{w['top1']:.4f} | {w['ppl']:.3f} | {b['kld_mean']:.4f} | {b['top1']:.4f} | "
                  f"{r['quantize_s']} | {r.get('process_s', '')} | {r['peak_rss_mib']} |")
    path.with_suffix(".md").write_text("\n".join(md) + "\n" + meta.get("notes", ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--sections", default="hqq")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50, help="autoround: iterations per block, lowbit and auto-round")
    ap.add_argument("--name", default="methods")
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    sessions = {t: open_session(model_dir, EvalSettings(t, 512, args.windows)) for t in TEXTS}
    meta = {"model": model_dir.name, "windows": args.windows, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "notes": ""}
    results = HERE / "results" / args.name
    results.parent.mkdir(exist_ok=True)
    rows: list[dict] = []
    bits = [int(b) for b in args.bits.split(",")]
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        work = Path(tmp)
        if "hqq" in args.sections.split(","):
            for b in bits:
                for cfg in (f"rtn:{b}:{args.group}:asym", f"hqq:{b}:{args.group}:asym",
                            f"hqq:{b}:{args.group}:asym:fzero"):
                    rows.append(lowbit_row(sessions, model_dir, cfg, work))
                    write_results(results, meta, rows)
                rows.append(hqq_peer_row(sessions, model_dir, b, args.group, work))
                write_results(results, meta, rows)
                print(f"done hqq {b}-bit", file=sys.stderr, flush=True)
            meta["notes"] += "\n" + hqq_notes(rows, bits, args.group)
        if "bnb" in args.sections.split(","):
            calib_npy, meta["calibration"] = write_calib(model_dir, work, args.samples, args.seqlen)
            for kind in ("nf4", "int8"):
                rows.append(bnb_peer_row(sessions, model_dir, kind, work))
                write_results(results, meta, rows)
                for cfg in (f"bnb:{kind}:rtn", f"bnb:{kind}:gptq", f"bnb:{kind}:gptq:act"):
                    rows.append(lowbit_bnb_row(sessions, model_dir, cfg, work, calib_npy))
                    write_results(results, meta, rows)
                print(f"done bnb {kind}", file=sys.stderr, flush=True)
        if "autoround" in args.sections.split(","):
            calib_npy, meta["calibration"] = write_calib(model_dir, work, args.samples, args.seqlen)
            meta["iters"] = args.iters
            it = args.iters
            for b in bits:
                g = 128 if b == 4 else args.group
                for amp in ((True, False) if b == 4 else ()):
                    try:
                        rows.append(autoround_peer_row(sessions, model_dir, 4, 128, it, work, calib_npy, amp))
                    except RuntimeError as exc:
                        (results.parent / f"{args.name}.autoround.error.txt").write_text(str(exc) + "\n")
                        meta["notes"] += f"auto-round failed: {str(exc).splitlines()[-1]}\n"
                    write_results(results, meta, rows)
                # float32 matmuls, SignRound alone (auto-round's recipe) and two restarts per block, beside the
                # default
                plain = tuple(f"autoround:{b}:{g}:i{it}:{f}" for f in ("fp32", "r2", "plain")) if b == 4 else ()
                for cfg in (f"autoround:{b}:{g}:i{it}", *plain, f"gptq:{b}:{g}", f"rtn:{b}:{g}"):
                    calib = None if cfg.startswith("rtn") else calib_npy
                    rows.append(lowbit_row(sessions, model_dir, cfg, work, calib))
                    write_results(results, meta, rows)
                print(f"done autoround {b}-bit", file=sys.stderr, flush=True)
            meta["notes"] += "\n" + autoround_notes(rows, bits, args.group, it)
    write_results(results, meta, rows)
    print(results.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
