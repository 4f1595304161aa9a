"""The Python API the CLI stands on: measure an artifact, compare candidates, decide, run the whole job.

    import lowbit
    rows = lowbit.evaluate("model-Q4_K_M.gguf", tasks=["arc_easy"], limit=200)
    verdict = lowbit.decide(rows)
    results = lowbit.run(target="llama.cpp", out="runs/mine")

Every function returns plain dicts (the same JSON the CLI prints), so results can be stored or diffed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lowbit.runtime import computing_on


def evaluate(artifact: str | Path, ref: str | Path | None = None, eval_text: str | None = None, ctx: int = 512,
             windows: int = 32, tasks: Sequence[str] = (), limit: int | None = None,
             runtime: str = "lowbit", device: str | None = None) -> list[dict]:
    """[FP row, artifact row] on the same tokens and questions (see `lowbit eval`); `device` as --device."""
    from lowbit.eval.compare import EvalSettings, artifact_kind, artifact_source, open_session
    from lowbit.eval.tasks import parse_tasks
    from lowbit.model.default import resolve_model
    from lowbit.report.table import with_delta

    artifact = Path(artifact)
    artifact_kind(artifact)
    settings = EvalSettings(eval_text, ctx, windows, None, tuple(parse_tasks(list(tasks))), limit)
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
    from lowbit.eval.compare import EvalSettings
    from lowbit.eval.tasks import parse_tasks
    from lowbit.model.default import resolve_model
    from lowbit.pipeline.candidates import parse_candidates
    from lowbit.pipeline.compare import compare_candidates

    settings = EvalSettings(eval_text, ctx, windows, None, tuple(parse_tasks(list(tasks))), limit)
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
