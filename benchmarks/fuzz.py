"""Coverage-guided fuzzing of every lowbit reader of untrusted files (issue 15, item 1).

    .venv/bin/python benchmarks/fuzz.py [--seconds 600] [--targets safetensors,gguf_model] [--jobs 2]

Each target (benchmarks/fuzz_targets.py) runs under atheris (libFuzzer) in its own process, seeded from
files cut from the embedded model, with lowbit's and gguf-py's Python code instrumented for coverage.

The oracle: a reader either succeeds or raises LowbitError with a one-line message (what the CLI prints
with exit code 2). Anything else is a crash:
  * any other exception (a KeyError, a numpy reshape error, RecursionError on deep JSON, ...): caught in
    the process, saved once per signature (exception type + the innermost lowbit line), fuzzing goes on;
  * an input running longer than 10 s (libFuzzer -timeout): a hang;
  * an allocation beyond the 4 GiB address space (RLIMIT_AS): MemoryError, torch's allocator error or a
    native abort, so a header claiming a 1 TB tensor that is believed, allocates and is found.
A process that stops on a hang or a native crash is restarted on its corpus until the time is spent.

Every crash input is kept in benchmarks/results/fuzz_crashes/TARGET/ and replayed against the current
code at the end of each campaign: a crash that now passes the oracle counts as fixed. Then the real CLI
is run on a few rejected inputs and on the fixed crash inputs of each target: a bad file must give exit
code 2 and one line on stderr, no traceback. Results: benchmarks/results/fuzz.json and fuzz.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CRASHES = RESULTS / "fuzz_crashes"
ADDRESS_SPACE = 4 << 30  # bytes a target process may map: a 1 TB claim that allocates fails loudly
INPUT_TIMEOUT = 10  # seconds one input may run before it is a hang
MAX_RESTARTS = 30  # per campaign and target: a target that keeps dying is reported, not looped on forever
CLI_SAMPLES = 2  # rejected inputs per target whose CLI error is checked

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The modules whose Python code is instrumented for coverage (imported under atheris.instrument_imports).
INSTRUMENTED = (
    "lowbit.errors", "lowbit.formats.safetensors_io", "lowbit.model.arch", "lowbit.model.hf",
    "lowbit.model.forward", "lowbit.formats.gguf", "lowbit.formats.gguf_vocab", "lowbit.formats.imatrix",
    "lowbit.formats.lowbit_ckpt", "lowbit.quant.gguf_mix", "lowbit.quant.gguf_pipeline",
    "lowbit.quant.ggml_blocks", "lowbit.calib.dataset", "lowbit.calib.text", "lowbit.eval.data",
    "lowbit.pipeline.plan", "lowbit.pipeline.verdict", "lowbit.pipeline.decide", "lowbit.pipeline.memory",
    "lowbit.plan.weights", "lowbit.plan.memory", "gguf", "gguf.gguf_reader", "gguf.quants", "gguf.vocab",
)


# ---------------------------------------------------------------- the oracle (inside a target process)


def signature(exc: BaseException) -> str:
    """Type and innermost lowbit source line of an exception: one crash, however many inputs reach it."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/src/lowbit/" in f.filename] or [f for f in frames if "/benchmarks/" in f.filename]
    f = (ours or frames or [None])[-1]
    where = f"{Path(f.filename).name}:{f.lineno}" if f else "?"
    return f"{type(exc).__name__}@{where}"


def crash_id(sig: str) -> str:
    return hashlib.sha1(sig.encode()).hexdigest()[:12]


def judge(run, folder: Path) -> tuple[str, str]:
    """('ok' | 'rejected' | 'crash', detail) for one input already written into `folder`."""
    from lowbit.errors import LowbitError

    try:
        run(folder)
    except LowbitError as exc:
        msg = str(exc)
        if "\n" in msg or "\r" in msg or not msg.strip():
            return "crash", f"LowbitError@multi-line message\nLowbitError: {msg[:300]!r}"
        return "rejected", msg
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every other exception is what the fuzzer looks for
        detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:]
        return "crash", f"{signature(exc)}\n{type(exc).__name__}: {str(exc)[:500]}\n{detail}"
    return "ok", ""


def scratch_base() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def scratch_prefix(target: str, pid: int) -> str:
    """Scratch folders carry their process id: the driver removes a killed worker's (libFuzzer ends a
    hang with _exit, so the worker's own cleanup never runs)."""
    return f"lowbit-fuzz-{target}-{pid}-"


class Scratch:
    """The folder one target's inputs are written into: fixed files once, fuzzed files per input."""

    def __init__(self, target, tiny: Path):
        self.folder = Path(tempfile.mkdtemp(prefix=scratch_prefix(target.name, os.getpid()), dir=scratch_base()))
        self.target = target
        target.fixed(tiny, self.folder)

    def write(self, data: bytes) -> Path:
        from fuzz_targets import split_files

        for name in self.target.files:
            (self.folder / name).unlink(missing_ok=True)
        for name, part in split_files(data, self.target.files).items():
            (self.folder / name).write_bytes(part)
        return self.folder

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Oracle:
    """libFuzzer's TestOneInput: judge each input, keep the first input of every crash signature and a few
    distinct rejected inputs (for the CLI check), and never stop the fuzzer on a Python-level crash."""

    def __init__(self, target, tiny: Path, workdir: Path):
        self.target, self.scratch = target, Scratch(target, tiny)
        self.crash_dir = CRASHES / target.name
        self.crash_dir.mkdir(parents=True, exist_ok=True)
        self.known = {json.loads(p.read_text())["signature"] for p in self.crash_dir.glob("*.json")}
        self.rejected_dir = workdir / "rejected" / target.name
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        self.rejected = {p.stem for p in self.rejected_dir.glob("*.bin")}

    def __call__(self, data: bytes) -> None:
        verdict, detail = judge(self.target.run, self.scratch.write(data))
        if verdict == "crash":
            self.save_crash(detail, data)
        elif verdict == "rejected" and len(self.rejected) < 50:
            key = crash_id(re.sub(r"\d+", "N", detail.split(": ", 1)[-1][:60]))
            if key not in self.rejected:
                self.rejected.add(key)
                (self.rejected_dir / f"{key}.bin").write_bytes(data)

    def save_crash(self, detail: str, data: bytes, kind: str = "exception") -> None:
        sig = detail.split("\n", 1)[0]
        if sig in self.known:
            return
        self.known.add(sig)
        save_crash_record(self.target.name, sig, kind, detail, data)
        print(f"\n[fuzz] new crash {sig}", file=sys.stderr, flush=True)


def save_crash_record(target: str, sig: str, kind: str, detail: str, data: bytes) -> None:
    d = CRASHES / target
    d.mkdir(parents=True, exist_ok=True)
    cid = crash_id(sig)
    (d / f"{cid}.bin").write_bytes(data)
    lines = detail.split("\n")
    meta = {"signature": sig, "kind": kind, "message": lines[1] if len(lines) > 1 else sig,
            "found": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "bytes": len(data)}
    (d / f"{cid}.json").write_text(json.dumps(meta, indent=1) + "\n")
    (d / f"{cid}.txt").write_text(detail + "\n")


def _import_instrumented() -> None:
    import importlib

    import atheris

    with atheris.instrument_imports(include=["lowbit", "gguf"]):
        for mod in INSTRUMENTED:
            importlib.import_module(mod)


def _quiet_process() -> None:
    """One CPU thread per target process (--jobs N runs N of them) and no library chatter in the logs."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def worker(name: str, seconds: int, workdir: Path) -> None:
    """One libFuzzer run of one target (the driver restarts it after a hang or a native crash)."""
    import atheris

    _import_instrumented()
    from fuzz_targets import TARGETS

    _quiet_process()
    target = TARGETS[name]
    oracle = Oracle(target, workdir / "tiny", workdir)
    corpus, seeds, artifacts = (workdir / d / name for d in ("corpus", "seeds", "artifacts"))
    for d in (corpus, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], f"-max_total_time={seconds}", f"-timeout={INPUT_TIMEOUT}", "-rss_limit_mb=4096",
            f"-artifact_prefix={artifacts}/", "-print_final_stats=1", "-reload=0", str(corpus), str(seeds)]
    atheris.Setup(args, lambda data: oracle(data))
    try:
        atheris.Fuzz()
    finally:
        oracle.scratch.close()


class InputTimeout(BaseException):
    """A replayed input ran past the limit. A BaseException, so that no `except Exception` in a reader
    can mistake the hang for a refusal."""


def replay(name: str, workdir: Path, files: list[Path]) -> None:
    """Judge saved inputs with the current code, one JSON line each (alarm-bounded, as the fuzzer is)."""
    from fuzz_targets import TARGETS

    _quiet_process()

    def on_alarm(signum, frame):
        raise InputTimeout(f"input ran longer than {INPUT_TIMEOUT} s")

    signal.signal(signal.SIGALRM, on_alarm)
    scratch = Scratch(TARGETS[name], workdir / "tiny")
    try:
        for f in files:
            signal.alarm(INPUT_TIMEOUT)
            verdict, detail = judge(TARGETS[name].run, scratch.write(f.read_bytes()))
            signal.alarm(0)
            print(json.dumps({"file": str(f), "verdict": verdict, "detail": detail.split("\n", 2)[:2]}), flush=True)
    finally:
        scratch.close()


# ---------------------------------------------------------------- the driver


def limit_memory() -> None:
    """preexec_fn of every target process: a bounded address space and its own process group."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    os.setsid()


def prepare(workdir: Path, names: list[str]) -> None:
    """The tiny model and each target's seeds, built once per work folder."""
    from fuzz_targets import TARGETS, build_tiny_model

    tiny = workdir / "tiny"
    if not (tiny / "model.safetensors").is_file():
        build_tiny_model(tiny)
    for name in names:
        d = workdir / "seeds" / name
        if d.is_dir() and any(d.iterdir()):
            continue
        d.mkdir(parents=True, exist_ok=True)
        for k, data in enumerate(TARGETS[name].seeds(tiny)):
            (d / f"seed-{k}.bin").write_bytes(data)


def _env() -> dict[str, str]:
    return {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _stats(log: str) -> dict:
    """Inputs run and coverage from one libFuzzer log."""
    execs = [int(m) for m in re.findall(r"^#(\d+)\s", log, re.M)]
    final = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    return {"inputs": int(final.group(1)) if final else max(execs, default=0),
            "cov": int(cov[-1][0]) if cov else None, "ft": int(cov[-1][1]) if cov else None,
            "corpus": int(cov[-1][2]) if cov else None}


def _collect_artifacts(name: str, workdir: Path, log: str) -> list[str]:
    """libFuzzer's own findings (hangs, out-of-memory, native crashes) as crash records."""
    found = []
    for f in sorted((workdir / "artifacts" / name).glob("*")):
        kind = f.name.split("-", 1)[0]  # timeout, oom, crash, slow-unit, leak
        if kind == "slow":
            f.unlink()
            continue
        sig = f"{kind}@{hashlib.sha1(f.read_bytes()).hexdigest()[:12]}"
        save_crash_record(name, sig, kind, f"{sig}\nlibFuzzer {kind}\n{log[-4000:]}", f.read_bytes())
        found.append(sig)
        f.unlink()
    return found


def fuzz_target(name: str, seconds: int, workdir: Path) -> dict:
    """Run one target for `seconds`, restarting it after a hang or a native crash."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start, runs, inputs, last, native = time.time(), 0, 0, {}, []
    while runs < MAX_RESTARTS:
        left = int(seconds - (time.time() - start))
        if left < 5:
            break
        log_path = logs / f"{name}-{runs}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--seconds", str(left),
               "--workdir", str(workdir), "--crashes", str(CRASHES)]
        with log_path.open("w") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_env(),
                                 preexec_fn=limit_memory)
            try:
                p.wait(timeout=left + 180)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for d in scratch_base().glob(scratch_prefix(name, p.pid) + "*"):
            shutil.rmtree(d, ignore_errors=True)
        text = log_path.read_text(errors="replace")
        st = _stats(text)
        inputs += st["inputs"]
        last = st if st["cov"] is not None else last
        native += _collect_artifacts(name, workdir, text)
        runs += 1
        if p.returncode == 0:
            break
    return {"target": name, "seconds": round(time.time() - start), "inputs": inputs, "process_starts": runs,
            "coverage": {"edges": last.get("cov"), "features": last.get("ft")}, "corpus": last.get("corpus"),
            "native_findings": native, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def replay_all(name: str, workdir: Path) -> dict[str, dict]:
    """Crash id -> replay verdict of every saved crash input of a target, with the current code."""
    todo = sorted((CRASHES / name).glob("*.bin"))
    out: dict[str, dict] = {}
    while todo:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--replay", name, "--workdir", str(workdir),
               "--crashes", str(CRASHES), *map(str, todo)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), preexec_fn=limit_memory,
                               timeout=60 + (INPUT_TIMEOUT + 5) * len(todo))
            stdout = p.stdout
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        for line in stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                out[Path(r["file"]).stem] = r
        done = {Path(f).stem for f in out}
        rest = [f for f in todo if f.stem not in done]
        if rest:  # the process died on rest[0] (a native crash or a hang the alarm could not interrupt)
            out[rest[0].stem] = {"file": str(rest[0]), "verdict": "crash", "detail": ["process died", ""]}
        todo = rest[1:]
    return out


def _materialise(name: str, data: bytes, workdir: Path, dest: Path) -> Path:
    from fuzz_targets import TARGETS, split_files

    dest.mkdir(parents=True, exist_ok=True)
    TARGETS[name].fixed(workdir / "tiny", dest)
    for fname, part in split_files(data, TARGETS[name].files).items():
        (dest / fname).write_bytes(part)
    return dest


def cli_check(name: str, data: bytes, workdir: Path) -> dict:
    """Run the real `lowbit` command on one bad input: exit 2, one line on stderr, no traceback."""
    from fuzz_targets import TARGETS

    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-cli-") as tmp:
        folder = _materialise(name, data, workdir, Path(tmp) / "in")
        argv = TARGETS[name].cli(folder, workdir / "tiny", Path(tmp))
        code = "import sys; from lowbit.cli import main; sys.exit(main(sys.argv[1:]))"
        try:
            p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp,
                               env=_env(), timeout=300, preexec_fn=limit_memory)
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired:
            rc, err = None, "timed out after 300 s"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    one_line = rc == 2 and len(lines) == 1 and lines[0].startswith("lowbit: error:") and "Traceback" not in err
    return {"command": "lowbit " + argv[0], "exit": rc, "ok": one_line or rc == 0,
            "stderr": lines[-1][:300] if lines else "", "stderr_lines": len(lines)}


def cli_checks(name: str, workdir: Path, fixed: list[Path]) -> list[dict]:
    """The CLI on a few rejected inputs and on every crash input that now gives a LowbitError."""
    rejected = sorted((workdir / "rejected" / name).glob("*.bin"))[:CLI_SAMPLES]
    return [{"input": f.name, **cli_check(name, f.read_bytes(), workdir)} for f in rejected + fixed]


def crash_table(name: str, replayed: dict[str, dict]) -> list[dict]:
    rows = []
    for meta_path in sorted((CRASHES / name).glob("*.json")):
        meta = json.loads(meta_path.read_text())
        r = replayed.get(meta_path.stem, {})
        status = "fixed" if r.get("verdict") in ("ok", "rejected") else "open"
        now = {"rejected": r.get("detail", [""])[0], "ok": "accepted"}.get(r.get("verdict"), "")
        rows.append({"id": meta_path.stem, "signature": meta["signature"], "kind": meta["kind"],
                     "message": meta["message"][:300], "found": meta["found"], "status": status, "now": now[:300],
                     "fix": meta.get("fix", "")})
    return rows


def campaign(name: str, seconds: int, workdir: Path, skip_cli: bool) -> dict:
    row = fuzz_target(name, seconds, workdir) if seconds > 0 else {"target": name}
    replayed = replay_all(name, workdir)
    crashes = crash_table(name, replayed)
    fixed_inputs = [CRASHES / name / f"{c['id']}.bin" for c in crashes if replayed.get(c["id"], {}).get("verdict")
                    == "rejected"]
    row["crashes"] = crashes
    row["cli_checks"] = [] if skip_cli else cli_checks(name, workdir, fixed_inputs)
    print(f"[fuzz] {name}: {row.get('inputs', '-')} inputs, {len(crashes)} crashes "
          f"({sum(c['status'] == 'fixed' for c in crashes)} fixed)", flush=True)
    return row


def _merge(old: dict, new: dict) -> dict:
    """A target's new campaign joins its earlier ones; crashes and CLI checks are the latest view."""
    history = old.get("campaigns", [])
    if "inputs" in new:
        history = history + [{k: new[k] for k in ("date", "seconds", "inputs", "process_starts", "coverage",
                                                    "corpus", "native_findings")}]
    return {"target": new["target"], "campaigns": history, "crashes": new["crashes"],
            "cli_checks": new["cli_checks"] or old.get("cli_checks", [])}


def write_report(rows: dict[str, dict]) -> None:
    from fuzz_targets import TARGETS

    doc = {"tool": "atheris (libFuzzer) on CPython, lowbit and gguf-py instrumented",
           "oracle": "success or a one-line LowbitError; any other exception, a hang over "
                     f"{INPUT_TIMEOUT} s or an allocation past a {ADDRESS_SPACE >> 30} GiB address space is a crash",
           "targets": [{"doc": TARGETS[n].doc if n in TARGETS else "", **rows[n]} for n in sorted(rows)]}
    (RESULTS / "fuzz.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = ["# Fuzzing lowbit's readers of untrusted files", "",
          f"`benchmarks/fuzz.py` ({doc['tool']}). Oracle: {doc['oracle']}.", "",
          "| reader | inputs tried | seconds | coverage (edges / features) | crashes found | fixed | open | "
          "CLI checks (exit 2, one line) |", "|---|---:|---:|---|---:|---:|---:|---|"]
    for n in sorted(rows):
        r = rows[n]
        camps = r["campaigns"]
        last = camps[-1] if camps else {}
        cov = last.get("coverage", {})
        cli = r["cli_checks"]
        md.append(f"| {n} | {sum(c['inputs'] for c in camps)} | {sum(c['seconds'] for c in camps)} | "
                  f"{cov.get('edges')} / {cov.get('features')} | {len(r['crashes'])} | "
                  f"{sum(c['status'] == 'fixed' for c in r['crashes'])} | "
                  f"{sum(c['status'] == 'open' for c in r['crashes'])} | "
                  f"{sum(c['ok'] for c in cli)}/{len(cli)} |")
    md += ["", "Inputs and seconds add up every campaign; coverage is the last campaign's (its corpus carries the "
           "earlier ones'). Crash inputs: `benchmarks/results/fuzz_crashes/TARGET/ID.bin` (+ `.txt` traceback).",
           "", "Readers:", ""] + [f"- {n}: {doc['targets'][i]['doc']}" for i, n in enumerate(sorted(rows))]
    md += ["", "## Campaigns", "", "| reader | ended | seconds | inputs | processes (restarts after hangs) | "
           "edges / features | hangs and native crashes |", "|---|---|---:|---:|---:|---|---:|"]
    for n in sorted(rows):
        for c in rows[n]["campaigns"]:
            md.append(f"| {n} | {c['date']} | {c['seconds']} | {c['inputs']} | {c['process_starts']} | "
                      f"{c['coverage'].get('edges')} / {c['coverage'].get('features')} | {len(c['native_findings'])} |")
    md += ["", "## Crashes", "", "| reader | id | signature | what it was | fix | status | the input now |",
           "|---|---|---|---|---|---|---|"]
    for n in sorted(rows):
        for c in rows[n]["crashes"]:
            cells = [c["message"], c.get("fix", ""), c["now"]]
            msg, fix, now = (x.replace("|", "\\|").replace("\n", " ")[:160] for x in cells)
            md.append(f"| {n} | {c['id']} | `{c['signature']}` | {msg} | {fix} | {c['status']} | {now} |")
    bad = [(n, c) for n in sorted(rows) for c in rows[n]["cli_checks"] if not c["ok"]]
    md += ["", "## CLI checks that failed", ""] + ([f"- {n}: `{c['command']}` on {c['input']}: exit {c['exit']}, "
                                                     f"{c['stderr_lines']} stderr lines, last: {c['stderr']}"
                                                     for n, c in bad] or ["none"])
    (RESULTS / "fuzz.md").write_text("\n".join(md) + "\n")


def main() -> int:
    global CRASHES, RESULTS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=600, help="fuzzing time per target (0: replay and CLI only)")
    ap.add_argument("--targets", default="all", help="comma-separated target names, or all")
    ap.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once (one CPU each)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lowbit-fuzz",
                    help="corpora, seeds, logs (kept between campaigns)")
    ap.add_argument("--crashes", type=Path, default=CRASHES, help="where crash inputs are kept and replayed from")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where fuzz.json and fuzz.md are written")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI checks")
    ap.add_argument("--no-report", action="store_true", help="do not update benchmarks/results/fuzz.{json,md}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--replay", help=argparse.SUPPRESS)
    ap.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    CRASHES, RESULTS = a.crashes.resolve(), a.results.resolve()
    if a.worker:
        worker(a.worker, a.seconds, a.workdir)
        return 0
    if a.replay:
        replay(a.replay, a.workdir, a.files)
        return 0
    from fuzz_targets import TARGETS

    names = sorted(TARGETS) if a.targets == "all" else a.targets.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    prepare(a.workdir, names)
    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        done = list(pool.map(lambda n: campaign(n, a.seconds, a.workdir, a.no_cli), names))
    (a.workdir / "last.json").write_text(json.dumps(done, indent=1))
    path = RESULTS / "fuzz.json"
    old = {t["target"]: t for t in json.loads(path.read_text())["targets"]} if path.is_file() else {}
    rows = {**old, **{r["target"]: _merge(old.get(r["target"], {}), r) for r in done}}
    if not a.no_report:
        write_report(rows)
    return 1 if any(c["status"] == "open" for r in done for c in r["crashes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
