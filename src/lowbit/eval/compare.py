"""Score FP and any number of quantized variants on the same windows against one FP reference.

This is the shared engine of `lowbit eval`, `lowbit compare` and the benchmark
harness, so every number in every table comes from the same code path.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lowbit.calib.dataset import CalibSet
from lowbit.calib.text import resolve_text
from lowbit.errors import LowbitError
from lowbit.eval.data import EvalWindows, load_tokenizer, make_windows
from lowbit.eval.reference import Reference, evaluate, get_reference
from lowbit.formats.lowbit_ckpt import LowbitCheckpoint
from lowbit.formats.safetensors_io import shard_files
from lowbit.model.default import cache_dir
from lowbit.model.forward import FolderWeights, WeightSource
from lowbit.model.hf import ModelFolder
from lowbit.quant.methods import QuantConfig
from lowbit.quant.pipeline import quantize_checkpoint
from lowbit.report.table import Row, with_delta

SOURCE_BITS = {"F32": 32, "F16": 16, "BF16": 16}


@dataclass(frozen=True)
class EvalSettings:
    eval_text: str | None = None
    ctx: int = 512
    windows: int = 32
    stride: int | None = None


@dataclass
class Session:
    """A model, its evaluation windows and its FP reference, ready to score variants."""

    model_dir: Path
    folder: ModelFolder
    windows: EvalWindows
    ref: Reference
    ref_seconds: float

    def fp_row(self) -> Row:
        s = self.ref.summary()
        size = sum(f.stat().st_size for f in shard_files(self.model_dir))
        bits = max(SOURCE_BITS.get(d, 32) for d in self.folder.store.dtypes.values())
        return Row(f"fp{bits}", float(bits), size, s.ppl, 0.0, 0.0, 1.0, self.ref_seconds, float(bits),
                   n_tokens=s.n_tokens, eval_text=self.windows.text_name)

    def score(self, source: WeightSource, config: str, bpw: float, size_bytes: int, seconds: float,
              bpw_model: float | None = None, **extra) -> Row:
        t0 = time.perf_counter()
        s = evaluate(source, self.windows, self.ref, label=f"eval {config}")
        return Row(config, bpw, size_bytes, s.ppl, s.kld_mean, s.kld_p99, s.top1, seconds, bpw_model,
                   eval_seconds=time.perf_counter() - t0, n_tokens=s.n_tokens, eval_text=self.windows.text_name,
                   extra=extra)

    def score_checkpoint(self, path: Path, config: str | None = None, seconds: float = 0.0) -> Row:
        """Score a checkpoint from disk; `seconds` is the quantization time when the caller measured it."""
        ck = LowbitCheckpoint(path)
        st = ck.meta.get("stats", {})
        return self.score(ck, config or ck.meta.get("config_name", path.name), st.get("bpw", 0.0), ck.size_bytes(),
                          seconds, st.get("bpw_model"))


    def score_artifact(self, path: Path) -> Row:
        """Score any artifact lowbit writes or reads: a lowbit checkpoint, a GGUF file (its exact
        dequantization) or an HF export folder (compressed-tensors, GPTQ, AWQ, through lowbit's exact reader)."""
        kind = artifact_kind(path)
        if kind == "lowbit":
            return self.score_checkpoint(path)
        if kind == "gguf":
            from lowbit.formats.gguf import GGUFWeights

            g = GGUFWeights(path)
            self._check_same_model(g.spec, path)
            return self.score(g, path.name, g.linear_bpw(), path.stat().st_size, 0.0, g.model_bpw())
        from lowbit.formats.hf_export import HFExport

        ex = HFExport(path)
        self._check_same_model(ex.spec, path)
        return self.score(ex, f"{ex.format.name}:{path.name}", float(ex.meta.get("file_bpw", 0.0)), ex.size_bytes(),
                          0.0)

    def _check_same_model(self, spec, path: Path) -> None:
        ours = self.folder.spec
        if (spec.vocab_size, spec.hidden_size, spec.num_layers) != (ours.vocab_size, ours.hidden_size, ours.num_layers):
            raise LowbitError(f"{path}: its shape (vocab {spec.vocab_size}, hidden {spec.hidden_size}, "
                              f"{spec.num_layers} layers) is not the reference model's ({self.model_dir}); "
                              "pass the model it was made from with --ref")


def artifact_kind(path: Path) -> str:
    """'lowbit', 'gguf' or 'hf-export', or a one-line error saying what `lowbit eval` takes."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if (path / "lowbit.json").is_file():
        return "lowbit"
    if (path / "config.json").is_file() and "quantization_config" in _read_json(path / "config.json"):
        return "hf-export"
    raise LowbitError(f"{path}: not a quantized artifact lowbit can score; pass a lowbit checkpoint, a .gguf file "
                      "or an exported compressed-tensors/GPTQ/AWQ folder")


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


def open_session(model_dir: Path, settings: EvalSettings) -> Session:
    folder = ModelFolder(model_dir)
    text = resolve_text(settings.eval_text, "wiki")
    windows = make_windows(load_tokenizer(model_dir), text, settings.ctx, settings.windows, settings.stride)
    t0 = time.perf_counter()
    ref = get_reference(FolderWeights(folder), model_dir, windows)
    return Session(model_dir, folder, windows, ref, time.perf_counter() - t0)


def compare(model_dir: Path, configs: list[QuantConfig], settings: EvalSettings,
            keep_dir: Path | None = None, calib: CalibSet | None = None) -> list[Row]:
    """FP row plus one row per config, each quantized to a real checkpoint and scored from disk."""
    session = open_session(model_dir, settings)
    rows = [session.fp_row()]
    work = Path(tempfile.mkdtemp(prefix="compare-", dir=cache_dir()))
    try:
        for qcfg in configs:
            out = (keep_dir or work) / qcfg.name.replace(":", "_")
            stats = quantize_checkpoint(model_dir, qcfg, out, overwrite=True, calib=calib)
            rows.append(session.score_checkpoint(out, qcfg.name, stats.seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return with_delta(rows)
