"""Score FP and any number of quantized variants on the same windows against one FP reference.

This is the shared engine of `lowbit eval`, `lowbit compare` and the benchmark
harness, so every number in every table comes from the same code path.
"""

from __future__ import annotations

import json

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lowbit.calib.text import resolve_text
from lowbit.errors import LowbitError
from lowbit.eval.data import EvalWindows, load_tokenizer, make_windows
from lowbit.eval.reference import Reference, evaluate, folder_fingerprint, get_reference
from lowbit.eval.significance import accuracy_summary, paired_summary
from lowbit.formats.atomic import atomic_file, cache_fill_lock
from lowbit.formats.lowbit_ckpt import LowbitCheckpoint
from lowbit.formats.safetensors_io import shard_files
from lowbit.model.default import cache_dir
from lowbit.model.forward import FolderWeights, WeightSource
from lowbit.model.hf import ModelFolder
from lowbit.report.table import Row

if TYPE_CHECKING:
    from lowbit.eval.tasks import TaskRequests, TaskScores

SOURCE_BITS = {"F32": 32, "F16": 16, "BF16": 16}
RUNTIMES = ("lowbit", "llama.cpp", "transformers")
TASK_CACHE_VERSION = 1


@dataclass(frozen=True)
class EvalSettings:
    eval_text: str | None = None
    ctx: int = 512
    windows: int = 32
    stride: int | None = None
    tasks: tuple[str, ...] = ()  # multiple-choice tasks (lowbit.eval.tasks.TASKS) scored beside the KLD
    limit: int | None = None  # first N questions of each task


@dataclass
class Session:
    """A model, its evaluation windows and its FP reference, ready to score variants."""

    model_dir: Path
    folder: ModelFolder
    windows: EvalWindows
    ref: Reference
    ref_seconds: float
    settings: EvalSettings = EvalSettings()
    _fp_tasks: dict | None = None
    _requests: dict | None = None

    def fp_row(self) -> Row:
        s = self.ref.summary()
        size = sum(f.stat().st_size for f in shard_files(self.model_dir))
        bits = max(SOURCE_BITS.get(d, 32) for d in self.folder.store.dtypes.values())
        extra = {"kind": "fp"}
        if self.settings.tasks:
            extra["tasks"] = {t: accuracy_summary(sc.correct, sc.correct_norm) for t, sc in self.fp_tasks().items()}
        return Row(f"fp{bits}", float(bits), size, s.ppl, 0.0, 0.0, 1.0, self.ref_seconds, float(bits),
                   n_tokens=s.n_tokens, eval_text=self.windows.text_name, extra=extra)

    def score(self, source: WeightSource, config: str, bpw: float, size_bytes: int, seconds: float,
              bpw_model: float | None = None, logits_fn=None, steps: int | None = None, **extra) -> Row:
        t0 = time.perf_counter()
        s = evaluate(source, self.windows, self.ref, label=f"eval {config}", logits_fn=logits_fn, steps=steps)
        if self.settings.tasks:
            extra["tasks"] = self.task_deltas(source, config)
        return Row(config, bpw, size_bytes, s.ppl, s.kld_mean, s.kld_p99, s.top1, seconds, bpw_model,
                   eval_seconds=time.perf_counter() - t0, n_tokens=s.n_tokens, eval_text=self.windows.text_name,
                   extra=extra)

    def task_requests(self) -> dict[str, TaskRequests]:
        from lowbit.eval.tasks import build_requests

        if self._requests is None:
            tok = load_tokenizer(self.model_dir)
            self._requests = {t: build_requests(tok, t, self.settings.limit) for t in self.settings.tasks}
        return self._requests

    def fp_tasks(self) -> dict[str, TaskScores]:
        """The FP model's per-question outcomes, cached on disk like the FP logits."""
        if self._fp_tasks is None:
            self._fp_tasks = {t: fp_task_scores(FolderWeights(self.folder), self.model_dir, reqs)
                              for t, reqs in self.task_requests().items()}
        return self._fp_tasks

    def task_deltas(self, source: WeightSource, config: str) -> dict[str, dict]:
        """Per task: accuracy with its interval, delta from FP, flips and McNemar's exact p."""
        from lowbit.eval.tasks import score_task

        fp = self.fp_tasks()
        out = {}
        for t, reqs in self.task_requests().items():
            q = score_task(source, reqs, label=f"{t} {config}")
            out[t] = paired_summary(fp[t].correct, q.correct, fp[t].correct_norm, q.correct_norm)
        return out

    def score_checkpoint(self, path: Path, config: str | None = None, seconds: float = 0.0) -> Row:
        """Score a checkpoint from disk; `seconds` is the quantization time when the caller measured it."""
        ck = LowbitCheckpoint(path)
        st = ck.meta.get("stats", {})
        return self.score(ck, config or ck.meta.get("config_name", path.name), st.get("bpw", 0.0), ck.size_bytes(),
                          seconds, st.get("bpw_model"), kind="lowbit")


    def score_artifact(self, path: Path, runtime: str = "lowbit", config: str | None = None,
                       seconds: float = 0.0) -> Row:
        """Score any artifact lowbit writes or reads: a lowbit checkpoint, a GGUF file (its exact
        dequantization, or llama.cpp's own logits with runtime='llama.cpp') or an HF export folder
        (compressed-tensors, GPTQ, AWQ, through lowbit's exact reader)."""
        row = self._score_artifact(Path(path), runtime, config, seconds)
        row.extra.setdefault("path", str(path))
        return row

    def _score_artifact(self, path: Path, runtime: str, config: str | None, seconds: float) -> Row:
        kind = artifact_kind(path)
        if runtime not in RUNTIMES:
            raise LowbitError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
        if runtime == "llama.cpp" and kind != "gguf":
            raise LowbitError(f"{path}: --runtime llama.cpp scores GGUF files only; drop --runtime for a {kind} artifact")
        if runtime == "transformers" and kind not in ("hf-export", "fp8"):
            raise LowbitError(f"{path}: --runtime transformers scores exported HF folders only; drop --runtime for a "
                              f"{kind} artifact")
        if kind == "lowbit":
            return self.score_checkpoint(path, config, seconds)
        if kind == "gguf":
            from lowbit.formats.gguf import GGUFWeights

            g = GGUFWeights(path)
            self._check_same_model(g.spec, path)
            logits_fn, steps = None, None
            if runtime == "llama.cpp":
                from lowbit.eval.llamacpp_runtime import llamacpp_logits_fn

                logits_fn, steps = llamacpp_logits_fn(path, g.spec.vocab_size), self.windows.tokens.shape[0]
            return self.score(g, config or path.name, g.linear_bpw(), path.stat().st_size, seconds, g.model_bpw(),
                              logits_fn=logits_fn, steps=steps, kind="gguf", runtime=runtime)
        if kind in PACKED_KINDS:
            b = open_artifact(path)
            self._check_same_model(b.spec, path)
            meta = json.loads((path / "lowbit_export.json").read_text()) if (path / "lowbit_export.json").is_file() \
                else {}
            logits_fn, steps = None, None
            if runtime == "transformers":  # an FP8 compressed-tensors folder: the library decompresses it on CPU
                from lowbit.eval.transformers_runtime import transformers_logits_fn

                logits_fn, steps = transformers_logits_fn(path, "compressed-tensors"), self.windows.tokens.shape[0]
            return self.score(b, config or f"{kind}-{b.kind}:{path.name}", float(meta.get("file_bpw", 0.0)),
                              b.size_bytes(), seconds, logits_fn=logits_fn, steps=steps, kind=f"{kind}-{b.kind}",
                              runtime=runtime)
        from lowbit.formats.hf_export import HFExport

        ex = HFExport(path)
        self._check_same_model(ex.spec, path)
        logits_fn, steps = None, None
        if runtime == "transformers":
            from lowbit.eval.transformers_runtime import transformers_logits_fn

            logits_fn, steps = transformers_logits_fn(path, ex.format.name), self.windows.tokens.shape[0]
        return self.score(ex, config or f"{ex.format.name}:{path.name}", float(ex.meta.get("file_bpw", 0.0)),
                          ex.size_bytes(), seconds, logits_fn=logits_fn, steps=steps, kind=ex.format.name,
                          runtime=runtime)

    def _check_same_model(self, spec, path: Path) -> None:
        ours = self.folder.spec
        if (spec.vocab_size, spec.hidden_size, spec.num_layers) != (ours.vocab_size, ours.hidden_size, ours.num_layers):
            raise LowbitError(f"{path}: its shape (vocab {spec.vocab_size}, hidden {spec.hidden_size}, "
                              f"{spec.num_layers} layers) is not the reference model's ({self.model_dir}); "
                              "pass the model it was made from with --ref")


# HF folders whose linears a quantizer stores packed in its own layout, by quant_method: lowbit reads them
# with their own reader (formats/bnb.py, formats/aqlm.py), not the grid exports' HFExport.
PACKED_METHODS = {"bitsandbytes": "bnb", "aqlm": "aqlm"}
PACKED_KINDS = (*PACKED_METHODS.values(), "mlx", "fp8")  # mlx: an MLX affine folder (formats/mlx.py), no quant_method;
# fp8: compressed-tensors with float8 weights (formats/compressed_tensors.py FP8Weights), not the int grids' HFExport


def artifact_kind(path: Path) -> str:
    """'lowbit', 'gguf', 'hf-export', 'bnb', 'aqlm', 'mlx' or 'fp8', or a one-line error saying what `lowbit eval` takes."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if (path / "lowbit.json").is_file():
        return "lowbit"
    if (path / "config.json").is_file() and _is_mlx(_read_json(path / "config.json")):
        return "mlx"
    if (path / "config.json").is_file() and "quantization_config" in _read_json(path / "config.json"):
        qc = _read_json(path / "config.json").get("quantization_config") or {}
        if _is_fp8(qc):
            return "fp8"
        return PACKED_METHODS.get(qc.get("quant_method"), "hf-export")
    raise LowbitError(f"{path}: not a quantized artifact lowbit can score; pass a lowbit checkpoint, a .gguf file "
                      "or an exported compressed-tensors/GPTQ/AWQ/bitsandbytes/AQLM folder")


def open_artifact(path: Path) -> WeightSource:
    """The weight source of any quantized artifact, chosen by artifact_kind."""
    kind = artifact_kind(path)
    if kind == "gguf":
        from lowbit.formats.gguf import GGUFWeights

        return GGUFWeights(path)
    if kind == "hf-export":
        from lowbit.formats.hf_export import HFExport

        return HFExport(path)
    if kind == "bnb":
        from lowbit.formats.bnb import BnbWeights

        return BnbWeights(path)
    if kind == "aqlm":
        from lowbit.formats.aqlm import AQLMWeights

        return AQLMWeights(path)
    if kind == "mlx":
        from lowbit.formats.mlx import MLXWeights

        return MLXWeights(path)
    if kind == "fp8":
        from lowbit.formats.compressed_tensors import FP8Weights

        return FP8Weights(path)
    return LowbitCheckpoint(path)


def _is_fp8(qc: dict) -> bool:
    from lowbit.formats.compressed_tensors import fp8_scheme

    return isinstance(qc, dict) and fp8_scheme(qc) is not None


def _is_mlx(config: dict) -> bool:
    from lowbit.formats.mlx import is_mlx_config

    return is_mlx_config(config)


def artifact_source(path: Path) -> str | None:
    """The source model an artifact records (lowbit checkpoints and exports do), for --ref's default."""
    path = Path(path)
    for meta in (path / "lowbit.json", path / "lowbit_export.json"):
        if meta.is_file():
            src = _read_json(meta).get("source_model")
            if src and (Path(src) / "config.json").is_file():
                return src
    return None


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LowbitError(f"{path}: cannot read it ({exc})") from None


def fp_task_scores(source: WeightSource, model_dir: Path, reqs: TaskRequests) -> TaskScores:
    """The FP model's outcomes on a task, from the cache keyed by model fingerprint and request digest."""
    import json

    from lowbit.eval.tasks import TaskScores, score_task

    path = cache_dir() / "tasks" / f"{folder_fingerprint(model_dir)}-{reqs.digest()}-v{TASK_CACHE_VERSION}.json"
    if path.is_file():
        return TaskScores.from_json(json.loads(path.read_text()))
    with cache_fill_lock(path):  # a second process waits and reads the first one's answers
        if path.is_file():
            return TaskScores.from_json(json.loads(path.read_text()))
        scores = score_task(source, reqs, label=f"{reqs.task} FP")
        with atomic_file(path, lock=False) as tmp:
            tmp.write_text(json.dumps(scores.to_json()))
    return scores


def open_session(model_dir: Path, settings: EvalSettings) -> Session:
    folder = ModelFolder(model_dir)
    text = resolve_text(settings.eval_text, "wiki")
    windows = make_windows(load_tokenizer(model_dir), text, settings.ctx, settings.windows, settings.stride)
    t0 = time.perf_counter()
    ref = get_reference(FolderWeights(folder), model_dir, windows)
    session = Session(model_dir, folder, windows, ref, time.perf_counter() - t0, settings)
    if settings.tasks:
        session.fp_tasks()  # a missing task package fails here, before any quantization
    return session
