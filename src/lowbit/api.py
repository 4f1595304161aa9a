"""The Python API the CLI stands on: measure an artifact, compare candidates, decide, run the whole job.

    import lowbit
    lowbit.quantize("path/to/model", "gguf:Q4_K_M:gptq", "model-Q4_K_M.gguf", calib_text="my.jsonl")
    rows = lowbit.evaluate("model-Q4_K_M.gguf", tasks=["arc_easy"], limit=200)
    verdict = lowbit.decide(rows)
    results = lowbit.run(target="llama.cpp", out="runs/mine")

Every function returns plain dicts (the same JSON the CLI prints), so results can be stored or diffed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lowbit.runtime import computing_on


def calibration(model: str | Path | None = None, text: str | Path | None = None, samples: int = 128,
                seqlen: int = 2048, seed: int = 0, mode: str = "chunk"):
    """The calibration sample matrix (a CalibSet: `samples` x `seqlen` tokens of `text`, the wiki calibration
    split by default, drawn with `seed`), as every calibrated command builds it; what was used goes to stderr."""
    from lowbit.calib.dataset import CalibConfig, build_calibration
    from lowbit.calib.text import resolve_text
    from lowbit.eval.data import load_tokenizer
    from lowbit.model.default import resolve_model
    from lowbit.model.hf import ModelFolder
    from lowbit.report.progress import info

    model_dir = resolve_model(model)
    cfg = CalibConfig(samples, seqlen, seed, mode)
    max_ctx = ModelFolder(model_dir).spec.max_position_embeddings
    calib = build_calibration(load_tokenizer(model_dir), resolve_text(text, "wiki-calib"), cfg, max_ctx)
    s = calib.summary
    info(f"calibration: {s['samples']} samples x {s['seqlen']} tokens from {s['file']} "
         f"({s['tokens']} tokens in {s['documents']} documents, {s['unused_tokens']} unused, seed {s['seed']})")
    return calib


def quantize(model: str | Path | None, config: str, out: str | Path, calib_text: str | Path | None = None,
             calib_samples: int = 128, calib_seqlen: int = 2048, seed: int = 0, calib_mode: str = "chunk",
             overwrite: bool = False, device: str | None = None) -> dict:
    """Write the artifact one config string describes, in `lowbit compare`'s grammar: `gptq:4:128:act` (a
    lowbit checkpoint), `awq:4:128@compressed-tensors` (an HF folder), `gguf:Q4_K_M:autoround` (a GGUF),
    `bnb:nf4:gptq`, `aqlm:2x8`. Calibrated configs draw their samples as `calibration` does. Atomic and
    resumable per layer like the CLI; returns {config, kind, path, seconds}."""
    from lowbit.errors import LowbitError
    from lowbit.formats.atomic import check_writable_target
    from lowbit.model.default import resolve_model
    from lowbit.pipeline.candidates import BuildContext, build_candidate, parse_candidate

    cand = parse_candidate(config)
    out = Path(out)
    if cand.kind == "gguf" and out.suffix != ".gguf":
        raise LowbitError(f"out {out}: a GGUF config writes a file; name it *.gguf")
    model_dir = resolve_model(model)
    check_writable_target(out, overwrite)
    calib = calibration(model_dir, calib_text, calib_samples, calib_seqlen, seed, calib_mode) \
        if cand.needs_calibration else None
    with computing_on(device):
        seconds = build_candidate(cand, BuildContext(model_dir, calib), out)
    return {"config": cand.text, "kind": cand.kind, "path": str(out), "seconds": round(seconds, 2)}


def run(model: str | Path | None = None, out: str | Path = "lowbit-run", target: str = "llama.cpp",
        method: str | None = None, calib_text: str | Path | None = None, calib_samples: int = 64,
        calib_seqlen: int = 512, seed: int = 0, calib_mode: str = "chunk", eval_text: str | None = None,
        ood_text: str | None = "botchan", ctx: int = 512, windows: int = 32,
        tasks: Sequence[str] = ("arc_easy", "piqa"), limit: int | None = None, plan: bool = False,
        overwrite: bool = False, device: str | None = None, **thresholds) -> dict:
    """The whole job (see `lowbit run`): calibrate, build and measure the target's ladder, decide, export the
    chosen file, write results.json and the report in `out`. `thresholds`: Thresholds' fields (max_ppl_rise,
    ppl_jump, max_task_drop). Returns results.json's content, with the report's paths under 'report'."""
    from lowbit.calib.text import check_disjoint
    from lowbit.errors import LowbitError
    from lowbit.model.default import resolve_model
    from lowbit.pipeline.decide import Thresholds
    from lowbit.pipeline.run import BEST_GGUF_METHOD, RUN_METHODS, RunConfig, run as run_job
    from lowbit.report.run_report import write_report

    method = method or BEST_GGUF_METHOD
    if method not in RUN_METHODS:
        raise LowbitError(f"--method {method!r}: choose one of {', '.join(RUN_METHODS)}")
    check_disjoint(eval_text, None if calib_text is None else str(calib_text))
    model_dir = resolve_model(model)
    out = Path(out)
    settings = eval_settings(eval_text, ctx, windows, None, tasks, limit)
    calib_args = (None if calib_text is None else str(calib_text), calib_samples, calib_seqlen, seed, calib_mode)
    cfg = RunConfig(model_dir, target, out, calib_args, settings, ood_text, thresholds=Thresholds(**thresholds),
                    method=method, plan=plan)
    with computing_on(device):
        results = run_job(cfg, lambda: calibration(model_dir, *calib_args), overwrite, _invocation("run"))
    md, html = write_report(out)
    return {**results, "report": {"md": str(md), "html": str(html)}}


def eval_settings(eval_text: str | None = None, ctx: int = 512, windows: int = 32, stride: int | None = None,
                  tasks: str | Sequence[str] | None = (), limit: int | None = None):
    """EvalSettings from the options every measuring command takes, checked (one-line errors)."""
    from lowbit.errors import LowbitError
    from lowbit.eval.compare import EvalSettings
    from lowbit.eval.tasks import parse_tasks

    if windows < 1:
        raise LowbitError(f"--windows {windows}: need at least 1 window")
    if limit is not None and limit < 1:
        raise LowbitError(f"--limit {limit}: need at least 1 question")
    return EvalSettings(eval_text, ctx, windows, stride, tuple(parse_tasks(tasks)), limit)


def _invocation(command: str) -> str:
    """The command line, when this process is `lowbit COMMAND ...` (recorded in the run's results)."""
    import sys

    return f"lowbit {command} " + " ".join(sys.argv[2:]) if sys.argv[1:2] == [command] else ""


def evaluate(artifact: str | Path, ref: str | Path | None = None, eval_text: str | None = None, ctx: int = 512,
             windows: int = 32, tasks: Sequence[str] = (), limit: int | None = None,
             runtime: str = "lowbit", device: str | None = None) -> list[dict]:
    """[FP row, artifact row] on the same tokens and questions (see `lowbit eval`); `device` as --device."""
    from lowbit.eval.compare import artifact_kind, artifact_source, open_session
    from lowbit.model.default import resolve_model
    from lowbit.report.table import with_delta

    artifact = Path(artifact)
    artifact_kind(artifact)
    settings = eval_settings(eval_text, ctx, windows, None, tasks, limit)
    with computing_on(device):
        session = open_session(resolve_model(ref or artifact_source(artifact)), settings)
        rows = with_delta([session.fp_row(), session.score_artifact(artifact, runtime=runtime)])
    return [r.to_json() for r in rows]


def compare(model: str | Path | None = None, configs: str = "gguf:Q4_K_M:imatrix,gguf:Q4_K_M:gptq",
            eval_text: str | None = None, ctx: int = 512, windows: int = 32, tasks: Sequence[str] = (),
            limit: int | None = None, calib=None, keep: str | Path | None = None,
            device: str | None = None) -> list[dict]:
    """FP row plus one row per config of any kind (see `lowbit compare`); `calib` is a CalibSet when a
    config needs calibration."""
    from lowbit.model.default import resolve_model
    from lowbit.pipeline.candidates import parse_candidates
    from lowbit.pipeline.compare import compare_candidates

    settings = eval_settings(eval_text, ctx, windows, None, tasks, limit)
    with computing_on(device):
        rows = compare_candidates(resolve_model(model), parse_candidates(configs), settings,
                                  Path(keep) if keep else None, calib)
    return [r.to_json() for r in rows]


def decide(rows: list[dict], **thresholds) -> dict:
    """The verdict for measured rows (FP first), with Thresholds' fields as keyword overrides."""
    from lowbit.pipeline.decide import Thresholds, decide_run

    return decide_run(rows, Thresholds(**thresholds)).to_json()


def memory(model: str | Path | None = None, config: str | Path | None = None, format: str = "gguf",
           file_type: str = "Q4_K_M", bits: int = 4, group_size: int = 128, ctx: int = 8192, batch: int = 1,
           kv_type: str = "f16", gpus: Sequence[str] = ()) -> dict:
    """Weights, KV cache and buffers of a deployment and the fits table (see `lowbit memory`); with
    `config` (a config.json) nothing else of the model is needed."""
    from lowbit.model.default import resolve_model
    from lowbit.pipeline.memory import memory_plan
    from lowbit.plan.weights import WeightRequest

    model_dir = None if config is not None else resolve_model(model)
    return memory_plan(model_dir, Path(config) if config is not None else None,
                       WeightRequest(format, file_type.upper(), (), bits, group_size), ctx, batch, kv_type,
                       list(gpus) or None)


def rotate(model: str | Path | None, out: str | Path, rotation: str = "hadamard", seed: int = 0,
           dtype: str = "float32", overwrite: bool = False) -> dict:
    """Fold the norms and a seeded rotation into the weights and write the result as an HF folder of the same
    architecture (see `lowbit rotate`); returns what its lowbit_rotation.json records."""
    from lowbit.model.default import resolve_model
    from lowbit.model.rotate import rotate_model

    return rotate_model(resolve_model(model), Path(out), rotation, seed, dtype, overwrite)
