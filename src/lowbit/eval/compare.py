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
