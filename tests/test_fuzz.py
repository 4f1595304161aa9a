"""Issue 15, item 1 (opt-in: pytest -m fuzz, about 13 minutes): every reader of untrusted files survives
60 s of coverage-guided fuzzing with no crash.

Each target of benchmarks/fuzz.py (safetensors shard, index, config.json, tokenizer files, GGUF as a
model and as an imatrix, lowbit's imatrix safetensors, lowbit checkpoint, calibration txt and jsonl,
plan recipe, decide's results.json) runs for 60 s under atheris from its real-file seeds, with a 10 s
limit per input and a 4 GiB address space. Every input must either be read or refused with a one-line
LowbitError; a crash's input and traceback are kept in the test's own crash folder. The 600 s campaigns
and the crashes they found and fixed are in benchmarks/results/fuzz.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuzz

REPO = Path(__file__).resolve().parents[1]
SECONDS = 60

sys.path.append(str(REPO / "benchmarks"))
from fuzz_targets import TARGETS  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One work folder for every target: the tiny model and the seeds are built once."""
    pytest.importorskip("atheris", reason="pip install -e '.[fuzz]' (atheris) to fuzz")
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_reader_survives_fuzzing(target: str, workdir: Path) -> None:
    crashes = workdir / "crashes"
    cmd = [sys.executable, str(REPO / "benchmarks" / "fuzz.py"), "--targets", target, "--seconds", str(SECONDS),
           "--workdir", str(workdir), "--crashes", str(crashes), "--no-cli", "--no-report"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=SECONDS + 600)
    assert (workdir / "last.json").is_file(), p.stdout[-2000:] + p.stderr[-2000:]
    (row,) = json.loads((workdir / "last.json").read_text())
    assert row["inputs"] > 0, row
    found = [f"{c['signature']}: {c['message']} (input {crashes / target / c['id']}.bin)" for c in row["crashes"]]
    assert not found, "\n".join(found)
