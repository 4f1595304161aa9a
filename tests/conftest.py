"""Shared fixtures: the real embedded model, real held-out text, and a small FP reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lowbit.calib.text import default_eval_text
from lowbit.eval.compare import EvalSettings, Session, open_session
from lowbit.model.default import default_model_dir

# Small but real: 4 windows of 256 tokens of held-out Wikipedia (1020 scored tokens).
TEST_SETTINGS = EvalSettings(eval_text="wiki", ctx=256, windows=4)


# Folders of session-scoped fixtures (tmp_path_factory.mktemp names): every other folder a test module's
# fixtures make is deleted when that module is done. A session fixture missing from this list loses its
# folder after its first module, and the next module that uses it fails loudly.
SESSION_FOLDERS = ("smollm2-2layers", "ggml_blocks_synthetic", "ggml_blocks_real")


@pytest.fixture(scope="module", autouse=True)
def _free_module_folders(tmp_path_factory: pytest.TempPathFactory):
    """Delete the folders a module's fixtures wrote once the module is done.

    Why: kept to the end of the session they add up to about 16 GB (tmp_path's own folders, another 10 GB,
    go as each test passes: tmp_path_retention_policy = "failed"), and CI's disk has run out at that.
    Autouse, so pytest sets it up before the module's other module-scoped fixtures and tears it down after
    them. A module that fails keeps its folders, to be looked at.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed_before = _FAILED_TESTS[0]
    yield
    if _FAILED_TESTS[0] != failed_before:
        return
    for path in set(base.iterdir()) - before:
        if path.is_dir() and not path.name.startswith(SESSION_FOLDERS):
            shutil.rmtree(path, ignore_errors=True)


_FAILED_TESTS = [0]  # failed setups, calls and teardowns so far in this session


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _FAILED_TESTS[0] += 1
    return report


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
