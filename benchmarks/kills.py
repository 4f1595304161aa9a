"""SIGKILL `lowbit quantize` at random points, rerun the same command, and compare the bytes.

For each kind (a lowbit checkpoint, a GGUF, a compressed-tensors export, a GPTQ checkpoint) the
command is first run undisturbed; the moment its `.OUT.partial` folder appears (the end of
start-up: imports, model checks, calibration) and the moment OUT is in place bound the kill points.
Each trial starts the command in a fresh folder, kills its whole process group (lowbit and any
workers) with SIGKILL at a uniformly drawn time in that span, records how far it had got (layers in the
partial state, a final temporary, a finished OUT), reruns the same command to completion, and
compares every file it leaves with the undisturbed run's. A rerun that answers "already exists" means
the kill came after OUT was renamed into place: OUT is then compared as it is.

Also checked per trial: after the rerun nothing but the outputs is left beside OUT (no `.partial`,
temporary or lock file).

    .venv/bin/python benchmarks/kills.py [--kills 20] [--kinds checkpoint,gguf,hf,gptq] [--seed 0]

writes benchmarks/results/kills.json and kills.md. The model is the llama-spm family model of
tests/families.py (real SentencePiece tokenizer) at width 256 with 6 layers, so every kind, the
GGUF K-quants included, applies to every tensor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
RESULTS = REPO / "benchmarks" / "results"
LOWBIT = [sys.executable, "-m", "lowbit.cli"]


def kinds(model: Path, calib: Path) -> dict[str, tuple[str, list[str]]]:
    """kind -> (output name, lowbit arguments without -o)."""
    q = ["quantize", str(model)]
    return {
        "checkpoint": ("q", q + ["--method", "rtn", "--bits", "4", "--group-size", "128"]),
        "gguf": ("q.gguf", q + ["--format", "gguf", "--type", "Q4_K_M"]),
        "hf": ("q", q + ["--format", "compressed-tensors", "--group-size", "128", "--no-measure"]),
        "gptq": ("q", q + ["--method", "gptq", "--group-size", "128", "--calib-text", str(calib),
                           "--calib-samples", "16", "--calib-seqlen", "256"]),
    }


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with log.open("ab") as fh:
        return subprocess.Popen([*LOWBIT, *args], stdout=fh, stderr=fh, env=env, start_new_session=True)


def undisturbed(args: list[str], out: Path) -> tuple[float, float, float]:
    """Run to completion; seconds until the partial state appeared, until OUT was in place, and in all."""
    partial = out.parent / f".{out.name}.partial"
    t0 = time.perf_counter()
    proc = _start(args, out.parent / "log.txt")
    t_work = t_out = None
    while proc.poll() is None:
        if t_work is None and (partial.exists() or any(out.parent.glob(f"..{out.name}.*.partial"))):
            t_work = time.perf_counter() - t0
        if t_out is None and out.exists():
            t_out = time.perf_counter() - t0
        time.sleep(0.005)
    total = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"undisturbed run failed:\n{(out.parent / 'log.txt').read_text()[-3000:]}")
    return (t_work if t_work is not None else 0.0), (t_out if t_out is not None else total), total


def progress_at_kill(out: Path) -> dict:
    """How far the killed run had got: layers in its partial state, a final temporary, OUT itself."""
    done = None
    for state in [*out.parent.glob(f".{out.name}.partial/state.json"),
                  *out.parent.glob(f"..{out.name}.*.partial/state.json")]:
        try:
            done = json.loads(state.read_text())["done"]
        except (OSError, ValueError, KeyError):
            pass
    return {"layers_done": done,
            "final_temporary": any(".tmp-" in p.name for p in out.parent.iterdir()),
            "hidden_checkpoint": (out.parent / f".{out.name}.lowbit-ckpt").is_dir(),  # HF: quantized, not exported
            "out_exists": out.exists()}


def phase(seen: dict) -> str:
    """Where the kill landed: start-up, between layers (k done), the final write, or after OUT was in place."""
    if seen["out_exists"]:
        return "after OUT"
    if seen["final_temporary"]:
        return "final write"
    if seen["hidden_checkpoint"]:
        return "export"
    return "start-up" if seen["layers_done"] is None else f"layers ({seen['layers_done']} done)"


def kill_at(args: list[str], out: Path, delay: float) -> dict | None:
    """Start the command and SIGKILL it after `delay` s; None if it finished first (no kill happened)."""
    for stale in out.parent.iterdir():  # a run that finished first: start the trial afresh
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    proc = _start(args, out.parent / "log.txt")
    try:
        proc.wait(timeout=delay)
        return None
    except subprocess.TimeoutExpired:
        seen = progress_at_kill(out)
        os.killpg(proc.pid, signal.SIGKILL)  # lowbit and its forked workers, as a crash or OOM kill of the job
        proc.wait()
    return {**seen, "phase": phase(seen)}


def trial(args: list[str], out: Path, lo: float, hi: float, rng: random.Random) -> dict:
    """Kill at a time drawn in [lo, hi] (drawn again, below the run's own time, if it finished first),
    then rerun the same command to completion."""
    for attempt in range(8):
        delay = rng.uniform(lo, hi)
        t0 = time.perf_counter()
        seen = kill_at(args, out, delay)
        if seen is not None:
            break
        hi = max(lo, min(hi, time.perf_counter() - t0) * 0.97)
    else:
        raise SystemExit(f"the command always finished before the kill: {args}")
    seen["redraws"] = attempt
    t0 = time.perf_counter()
    rerun = subprocess.run([*LOWBIT, *args], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    row = {"delay_s": round(delay, 3), **seen, "rerun_rc": rerun.returncode,
           "rerun_s": round(time.perf_counter() - t0, 2), "resumed": "resuming" in rerun.stderr,
           "rerun_already_exists": rerun.returncode == 2 and "already exists" in rerun.stderr}
    if rerun.returncode and not row["rerun_already_exists"]:
        row["rerun_error"] = rerun.stderr[-2000:]
    return row


def build_model(root: Path) -> tuple[Path, Path]:
    from families import build_family_model

    from lowbit.calib.text import default_calib_text

    model = build_family_model("llama-spm", root / "model", overrides={"num_hidden_layers": 6})
    calib = root / "calib.txt"
    calib.write_text(default_calib_text().read_text(encoding="utf-8")[:200000], encoding="utf-8")
    return model, calib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--kinds", default="checkpoint,gguf,hf,gptq")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="kills")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="lowbit-kills-"))
    model, calib = build_model(work)
    table = kinds(model, calib)
    report = {"kills_per_kind": a.kills, "seed": a.seed, "model": "llama-spm family model, 6 layers, width 256",
              "kinds": {}}
    try:
        for kind in a.kinds.split(","):
            name, args = table[kind]
            ref_dir = work / kind / "ref"
            ref_dir.mkdir(parents=True)
            t_work, t_out, total = undisturbed([*args, "-o", str(ref_dir / name)], ref_dir / name)
            (ref_dir / "log.txt").unlink()
            want = tree(ref_dir)
            # from just before the first layer to just after OUT is in place: once OUT is there the
            # process only exits, and a kill in that tail (up to seconds on a loaded machine) shows nothing
            lo, hi = max(0.0, t_work - 0.25), t_out + 0.25
            rows = []
            for k in range(a.kills):
                d = work / kind / f"t{k:02d}"
                d.mkdir()
                cmd = [*args, "-o", str(d / name)]
                row = trial(cmd, d / name, lo, hi, rng)
                (d / "log.txt").unlink(missing_ok=True)
                got = tree(d)
                row["identical"] = got == want
                row["left_beside_out"] = sorted(set(got) - set(want)) + sorted(
                    p.name for p in d.iterdir() if p.name.startswith("."))
                rows.append(row)
                print(f"{kind} {k:2d}: kill at {row['delay_s']:6.2f}s  {row['phase']:18s} "
                      f"identical={row['identical']}  left={row['left_beside_out']}", flush=True)
                shutil.rmtree(d)
            report["kinds"][kind] = {
                "command": "lowbit " + " ".join([*args, "-o", f"OUT/{name}"]).replace(str(work), "WORK"),
                "undisturbed_s": round(total, 2), "work_starts_s": round(t_work, 2), "out_in_place_s": round(t_out, 2),
                "kills": len(rows), "identical": sum(r["identical"] for r in rows),
                "clean": sum(not r["left_beside_out"] for r in rows),
                "resumed": sum(r["resumed"] for r in rows), "trials": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{a.name}.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    lines = ["# SIGKILL at random points of `lowbit quantize`, then the same command again",
             "",
             f"{report['model']}; {report['kills_per_kind']} kills per kind (seed {report['seed']}), each at a "
             "uniformly drawn time from just before the first layer (when `.OUT.partial` appears in the "
             "undisturbed run) to just after OUT is in place, killing the whole process group (SIGKILL). "
             "`benchmarks/kills.py`.",
             "",
             "| kind | undisturbed s | kills | byte-identical | nothing left beside OUT | rerun resumed from "
             "kept layers | where the kills landed |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for kind, k in report["kinds"].items():
        phases: dict[str, int] = {}
        for r in k["trials"]:
            phases[r["phase"]] = phases.get(r["phase"], 0) + 1
        where = ", ".join(f"{n}x {ph}" for ph, n in sorted(phases.items()))
        lines.append(f"| {kind} | {k['undisturbed_s']} | {k['kills']} | {k['identical']}/{k['kills']} | "
                     f"{k['clean']}/{k['kills']} | {k['resumed']} | {where} |")
    lines += ["", "Commands (OUT a fresh folder per trial):", ""]
    lines += [f"* {kind}: `{k['command']}`" for kind, k in report["kinds"].items()]
    lines += ["", "Where a kill landed: start-up (before the first layer was saved), between layers (k saved in "
              "`.OUT.partial`), the final write (a `.OUT.tmp-*` temporary existed; for a GGUF from the moment its "
              "Modelfile's temporary is written, for compressed-tensors the hidden lowbit checkpoint's assembly "
              "and the export), or after OUT was in place (the run was removing its partial folder and exiting). "
              "A compressed-tensors run killed after its layers were assembled quantizes again from the first "
              "layer on the rerun: the hidden checkpoint is not reused. The seconds are wall times on a shared "
              "2-core machine under other jobs' load."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
