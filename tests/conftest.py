"""Shared fixtures: the real embedded model, real held-out text, and a small FP reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit.calib.text import default_eval_text
from lowbit.eval.compare import EvalSettings, Session, open_session
from lowbit.model.default import default_model_dir

# Small but real: 4 windows of 256 tokens of held-out Wikipedia (1020 scored tokens).
TEST_SETTINGS = EvalSettings(eval_text="wiki", ctx=256, windows=4)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="session")
def eval_text() -> Path:
    return default_eval_text()


@pytest.fixture(scope="session")
def session(model_dir: Path) -> Session:
    return open_session(model_dir, TEST_SETTINGS)
