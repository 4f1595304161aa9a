"""`lowbit run`: the whole job in one command.

Calibrate once; walk the target's ladder of candidates (the seeds' recommended
files for that runtime, each with lowbit's best calibrated method beside the
standard one); build each candidate as the real file, measure it against FP
(KLD and PPL on the held-out text and on an out-of-domain text, task accuracy
with flips, per-layer error); decide with the seeds' table; step up a rung
only when the verdict says so; export the chosen file with its serving
hand-off; write results.json and the report.

Everything lands in OUT_DIR. Each measured candidate is saved as
candidates/NAME.json when done, so a killed run resumes where it stopped (the
builders themselves resume per layer), and a finished run re-decides and
re-reports in seconds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lowbit import __version__
from lowbit.calib.dataset import CalibSet
from lowbit.errors import LowbitError
from lowbit.eval.compare import EvalSettings, Session, open_session
from lowbit.eval.reference import folder_fingerprint
from lowbit.formats.atomic import output_lock
from lowbit.pipeline.candidates import BuildContext, Candidate, build_candidate, parse_candidate
from lowbit.pipeline.compare import score_candidate
from lowbit.pipeline.decide import CommandHint, Thresholds, Verdict, decide_run
from lowbit.report.progress import info

RESULTS = "results.json"
STATE = "run.json"

# The seeds' recommended files per runtime, one rung per list; {best} is lowbit's best calibrated method.
LADDERS: dict[str, list[list[str]]] = {
    "llama.cpp": [["gguf:Q4_K_M:imatrix", "gguf:Q4_K_M:{best}"], ["gguf:Q5_K_M:imatrix", "gguf:Q5_K_M:{best}"],
                  ["gguf:Q8_0"]],
    "vllm": [["gptq:4:128@compressed-tensors", "awq:4:128@compressed-tensors"], ["gptq:8:128@compressed-tensors"]],
    "transformers": [["gptq:4:128@compressed-tensors", "awq:4:128@compressed-tensors"],
                     ["gptq:8:128@compressed-tensors"]],
}
BEST_GGUF_METHOD = "gptq"  # 0.70x llama.cpp+imatrix KLD at Q4_K_M for half of awq-gptq's time
RUN_METHODS = ("gptq", "awq", "awq-gptq", "autoround")  # --method: the calibrated GGUF rung beside imatrix


@dataclass(frozen=True)
class RunConfig:
    model_dir: Path
    target: str
    out: Path
    calib_args: tuple  # (calib_text, samples, seqlen, seed, mode), as the CLI's _calibration takes them
    settings: EvalSettings
    ood_text: str | None = "botchan"
    ood_windows: int = 16
    thresholds: Thresholds = Thresholds()
    method: str = BEST_GGUF_METHOD
    layer_windows: int = 4
    plan: bool = False  # llama.cpp: each K-quant rung also gets lowbit plan's mix at its stock size

    def __post_init__(self) -> None:
        if self.target not in LADDERS:
            raise LowbitError(f"--target {self.target!r}: choose one of {', '.join(LADDERS)}")
        if self.plan and self.target != "llama.cpp":
            raise LowbitError("--plan: plans are per-tensor GGUF mixes; use it with --target llama.cpp")

    def ladder(self) -> list[list[Candidate]]:
        rungs = [[c.format(best=self.method) for c in rung] for rung in LADDERS[self.target]]
        if self.plan:
            rungs = [rung + [f"{rung[-1]}:plan"] if len(rung[-1].split(":")) == 3 else rung for rung in rungs]
        return [[parse_candidate(c) for c in rung] for rung in rungs]

    def key(self) -> str:
        """What the measurements depend on; a run directory holds one key."""
        d = {"model": folder_fingerprint(self.model_dir), "target": self.target, "calib": list(map(str, self.calib_args)),
             "settings": asdict(self.settings), "ood": [self.ood_text, self.ood_windows], "method": self.method,
             "layer_windows": self.layer_windows, **({"plan": True} if self.plan else {})}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class RunState:
    cfg: RunConfig
    main: Session
    ood: Session | None
    ctx: BuildContext
    rows: list[dict] = field(default_factory=list)

    @property
    def cand_dir(self) -> Path:
        return self.cfg.out / "candidates"


def prepare_out(cfg: RunConfig, overwrite: bool) -> None:
    """Create OUT (or resume it): a folder of another run is refused, never mixed."""
    state = cfg.out / STATE
    if cfg.out.exists() and not state.is_file() and any(cfg.out.iterdir()):
        if not overwrite:
            raise LowbitError(f"{cfg.out}: exists and is not a lowbit run folder; pass another -o or --overwrite")
        shutil.rmtree(cfg.out)
    if state.is_file():
        old = json.loads(state.read_text()).get("key")
        if old != cfg.key():
            if not overwrite:
                raise LowbitError(f"{cfg.out}: holds a run with other settings (key {old}); pass the same options "
                                  "to resume it, another -o, or --overwrite")
            shutil.rmtree(cfg.out)
    (cfg.out / "candidates").mkdir(parents=True, exist_ok=True)
    _write_json(state, {"key": cfg.key(), "model": str(cfg.model_dir), "target": cfg.target,
                        "lowbit_version": __version__})


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def measure_candidate(st: RunState, cand: Candidate) -> dict:
    """Build (or reuse) the candidate's file and measure it; cached as candidates/NAME.json."""
    saved = st.cand_dir / f"{cand.file_name}.json"
    if saved.is_file():
        info(f"{cand.label}: measured before, reusing {saved}")
        return json.loads(saved.read_text())
    path = st.cand_dir / cand.file_name
    info(f"{cand.label}: building {path.name}")
    seconds = build_candidate(cand, st.ctx, path)
    info(f"{cand.label}: built in {seconds:.0f} s; measuring KLD, tasks, out-of-domain KLD and per-layer error")
    row = score_candidate(st.main, cand, path, seconds).to_json()
    if st.ood is not None:
        o = score_candidate(st.ood, cand, path, seconds)
        row["ood"] = {"eval_text": o.eval_text, "ppl": o.ppl, "delta_ppl": o.ppl - st.ood.ref.summary().ppl,
                      "kld_mean": o.kld_mean, "kld_p99": o.kld_p99, "top1": o.top1, "n_tokens": o.n_tokens}
    row["per_layer"] = _layer_errors(st, path)
    row["path"] = str(path.relative_to(st.cfg.out))
    if cand.plan:
        row["plan"] = _plan_summary(path, st.cfg.out)
    _write_json(saved, row)
    info(f"{cand.label}: KLD {row['kld_mean']:.4f}, PPL {row['ppl']:.3f}, {row['size_bytes'] / 1e6:.1f} MB, "
         f"{seconds:.0f} s to build")
    return row


def _plan_summary(gguf: Path, out: Path) -> dict:
    """What the report shows of a planned candidate: its types, estimates and the frontier it cut."""
    from lowbit.pipeline.plan import recipe_path

    recipe = json.loads(recipe_path(gguf).read_text())
    plan = recipe["plan"]
    return {"recipe": str(recipe_path(gguf).relative_to(out)), "tensor_types": recipe["tensor_types"],
            "stock": plan["budget"]["stock"], "budget_bytes": plan["budget"]["size"],
            "estimated_kld": plan["estimated_kld"], "stock_estimated_kld": plan["stock_estimated_kld"],
            "frontier": plan["frontier"]}


def _layer_errors(st: RunState, path: Path) -> list[dict]:
    from lowbit.eval.compare import open_artifact
    from lowbit.eval.layer_error import layer_errors
    from lowbit.model.forward import FolderWeights

    tokens = st.main.windows.tokens[: st.cfg.layer_windows]
    return layer_errors(FolderWeights(st.main.folder), open_artifact(path), tokens)


def fp_row(st: RunState) -> dict:
    row = st.main.fp_row().to_json()
    if st.ood is not None:
        s = st.ood.ref.summary()
        row["ood"] = {"eval_text": st.ood.windows.text_name, "ppl": s.ppl, "delta_ppl": 0.0, "kld_mean": 0.0,
                      "kld_p99": 0.0, "top1": 1.0, "n_tokens": s.n_tokens}
    row["path"] = str(st.cfg.model_dir)
    return row


def run(cfg: RunConfig, calibrate, overwrite: bool = False, command: str = "") -> dict:
    """Walk the ladder, decide, export, and write results.json; returns the results.

    The run folder's output lock is held throughout: a second process on the same -o is refused."""
    with output_lock(cfg.out):
        return _run(cfg, calibrate, overwrite, command)


def _run(cfg: RunConfig, calibrate, overwrite: bool, command: str) -> dict:
    t0 = time.perf_counter()
    prepare_out(cfg, overwrite)
    calib: CalibSet = calibrate()
    tasks = f" and {', '.join(cfg.settings.tasks)} (limit {cfg.settings.limit})" if cfg.settings.tasks else ""
    info(f"FP reference: {cfg.settings.windows} x {cfg.settings.ctx} tokens{tasks} (cached after the first run)")
    main = open_session(cfg.model_dir, cfg.settings)
    ood = None
    if cfg.ood_text:
        info(f"FP reference out of domain: {cfg.ood_text}, {cfg.ood_windows} x {cfg.settings.ctx} tokens")
        ood = open_session(cfg.model_dir, EvalSettings(cfg.ood_text, cfg.settings.ctx, cfg.ood_windows))
    st = RunState(cfg, main, ood, BuildContext(cfg.model_dir, calib))
    st.rows = [fp_row(st)]
    hint = CommandHint(str(cfg.model_dir), cfg.calib_args[0], str(cfg.out))
    verdict: Verdict | None = None
    for n, rung in enumerate(cfg.ladder()):
        info(f"rung {n + 1}: {', '.join(c.label for c in rung)}")
        st.rows += [measure_candidate(st, c) for c in rung]
        verdict = decide_run(st.rows, cfg.thresholds, hint)
        info(f"verdict after rung {n + 1}: {verdict.action} {verdict.choice}")
        if verdict.action != "step-up":
            break
    _fill_delta(st.rows)
    results = {
        "schema": 1, "lowbit_version": __version__, "model": str(cfg.model_dir), "model_name": cfg.model_dir.name,
        "target": cfg.target, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {"eval_text": main.windows.text_name, "ood_text": ood.windows.text_name if ood else None,
                     "ctx": cfg.settings.ctx, "windows": cfg.settings.windows, "calib": calib.summary,
                     "tasks": list(cfg.settings.tasks), "limit": cfg.settings.limit,
                     "thresholds": asdict(cfg.thresholds), "method": cfg.method},
        "rows": st.rows, "verdict": None, "exports": export_choice(st, verdict) if verdict else [],
        "commands": [command] if command else [],
        "seconds": time.perf_counter() - t0,
    }
    if verdict and results["exports"]:
        verdict.next_command = results["exports"][0]["serve"]  # the exported file, not the candidate
    results["verdict"] = verdict.to_json() if verdict else None
    _write_json(cfg.out / RESULTS, results)
    return results


def _fill_delta(rows: list[dict]) -> None:
    base = rows[0]["ppl"]
    for r in rows:
        r["delta_ppl"] = r["ppl"] - base


def export_choice(st: RunState, verdict: Verdict) -> list[dict]:
    """Copy the shipped file to OUT/export with its serving hand-off; nothing is exported unless it ships."""
    if verdict.action != "ship":
        return []
    row = next(r for r in st.rows if r["config"] == verdict.choice)
    src = st.cfg.out / row["path"]
    export = st.cfg.out / "export"
    export.mkdir(exist_ok=True)
    name = st.cfg.model_dir.name.lower().replace("_", "-")
    if src.suffix == ".gguf":
        parts = verdict.choice.split(":")
        ft = parts[1] + ("-plan" if parts[-1] == "plan" else "")
        dst = export / f"{st.cfg.model_dir.name}-{ft}.gguf"
        _copy_atomic(src, dst)
        modelfile = _modelfile(src, dst)
        tag = f"{name}:{ft.lower()}"
        return [{"path": str(dst.relative_to(st.cfg.out)), "handoff": str(modelfile.relative_to(st.cfg.out)),
                 "serve": f"ollama create {tag} -f {modelfile} && ollama run {tag}"}]
    dst = export / src.name
    if dst.exists():
        shutil.rmtree(dst)
    tmp = export / f".{src.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.replace(dst)
    if st.cfg.target == "vllm":
        serve = f"vllm serve {dst}"
    else:
        serve = (f"python -c \"from transformers import AutoModelForCausalLM; "
                 f"AutoModelForCausalLM.from_pretrained('{dst}')\"")
    return [{"path": str(dst.relative_to(st.cfg.out)), "handoff": None, "serve": serve}]


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def _modelfile(src: Path, dst: Path) -> Path:
    """The builder's Modelfile beside the candidate, re-pointed at the exported file."""
    built = src.with_name(src.stem + ".Modelfile")
    lines = built.read_text().splitlines() if built.is_file() else [f"FROM ./{src.name}"]
    lines = [f"FROM ./{dst.name}" if ln.startswith("FROM ") else ln for ln in lines]
    out = dst.parent / "Modelfile"
    tmp = out.with_name(".Modelfile.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return out
