"""`lowbit compare`: build every candidate (any kind), score each from disk, one table against FP."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lowbit.calib.dataset import CalibSet
from lowbit.eval.compare import EvalSettings, Session, open_session
from lowbit.model.default import cache_dir
from lowbit.pipeline.candidates import BuildContext, Candidate, build_candidate
from lowbit.report.table import Row, with_delta


def score_candidate(session: Session, cand: Candidate, path: Path, seconds: float) -> Row:
    row = session.score_artifact(path, config=cand.label, seconds=seconds)
    row.extra["kind"] = cand.kind if cand.kind != "hf" else cand.fmt
    return row


def compare_candidates(model_dir: Path, candidates: list[Candidate], settings: EvalSettings,
                       keep_dir: Path | None = None, calib: CalibSet | None = None) -> list[Row]:
    """FP row plus one row per candidate, each written to a real file and scored from disk."""
    session = open_session(model_dir, settings)
    rows = [session.fp_row()]
    ctx = BuildContext(model_dir, calib)
    work = Path(tempfile.mkdtemp(prefix="compare-", dir=cache_dir()))
    try:
        for cand in candidates:
            out = (keep_dir or work) / cand.file_name
            if keep_dir:
                keep_dir.mkdir(parents=True, exist_ok=True)
            seconds = build_candidate(cand, ctx, out)
            rows.append(score_candidate(session, cand, out, seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return with_delta(rows)
