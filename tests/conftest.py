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


@pytest.fixture(scope="session")
def small_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model cut to its first two decoder layers: real weights and tokenizer, 15x less work.

    For plumbing checks of whole-model pipelines (resume, determinism, file layouts, loaders);
    quality claims use the full model.
    """
    import json
    import shutil

    from safetensors.torch import save_file

    from lowbit.model.hf import ModelFolder

    out = tmp_path_factory.mktemp("smollm2-2layers")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (out / "config.json").write_text(json.dumps(config, indent=2))
    folder = ModelFolder(model_dir)
    keep = [n for n in folder.names() if not n.startswith("model.layers.") or int(n.split(".")[2]) < 2]
    save_file({n: folder.get(n).contiguous() for n in keep}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
