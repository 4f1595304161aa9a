"""Scale: memory bounded by one layer whatever the depth, and hub ids resolved from the local HF cache.

Peak RSS is read from a fresh interpreter per run (ru_maxrss of that process), so one run's
allocations cannot hide in another's high-water mark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from families import build_family_model
from lowbit.errors import LowbitError
from lowbit.model.default import resolve_model

# Wide enough that a layer (4.2M weights, 17 MB in float32) is visible beside the interpreter's own
# ~400 MB: holding 8 layers' weights, Hessians or output would add over 100 MB.
SHAPE = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 8}

CHILD = r"""
import resource, sys
from pathlib import Path
from lowbit.calib.dataset import CalibConfig, build_calibration
from lowbit.calib.text import default_calib_text
from lowbit.eval.data import load_tokenizer
from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf
from lowbit.quant.methods import parse_config
from lowbit.quant.pipeline import quantize_checkpoint
model, out, job = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if job == "gguf":
    quantize_to_gguf(model, GGUFConfig("Q4_K_M", "rtn"), out / "m.gguf")
else:
    calib = build_calibration(load_tokenizer(model), default_calib_text(), CalibConfig(8, 128, seed=0))
    quantize_checkpoint(model, parse_config("gptq:4:128"), out / "ck", calib=calib)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss_mib(model: Path, out: Path, job: str) -> float:
    out.mkdir()
    # One process (LOWBIT_WORKERS=1), so its ru_maxrss is the whole run's memory: worker processes
    # only ever hold one row chunk of one tensor each.
    res = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), job], capture_output=True, text=True,
                         env={**os.environ, "LOWBIT_WORKERS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    return float(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shallow_and_deep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("depth")
    return tuple(build_family_model("llama-spm", root / f"L{n}", overrides={**SHAPE, "num_hidden_layers": n},
                                    shard_bytes=16 << 20) for n in (2, 8))


@pytest.mark.parametrize("job", ["gguf", pytest.param("gptq", marks=pytest.mark.slow)])  # gptq: -m slow (budget)
def test_peak_rss_does_not_grow_with_depth(shallow_and_deep, tmp_path: Path, job: str) -> None:
    shallow, deep = shallow_and_deep
    small = peak_rss_mib(shallow, tmp_path / "shallow", job)
    large = peak_rss_mib(deep, tmp_path / "deep", job)
    assert large < 1.10 * small, f"{job}: peak RSS {small:.0f} MiB with 2 layers, {large:.0f} MiB with 8"


def _fake_hub_cache(root: Path, repo: str, source: Path, commit: str, tag: str | None = None) -> Path:
    """The layout huggingface_hub writes: blobs, snapshots/<commit>/ (symlinks to blobs), refs/<branch>."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for f in source.iterdir():
        blob = base / "blobs" / f"{f.name}.blob"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    if tag:
        (base / "refs" / tag).write_text(commit)
    return snap


def test_hub_id_resolves_from_the_local_cache(small_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from lowbit.model.hf import ModelFolder

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = _fake_hub_cache(cache, "HuggingFaceTB/SmolLM2-135M-Instruct", small_model_dir, commit, tag="v1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == snap
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct@v1") == snap
    folder = ModelFolder(resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert folder.spec.num_layers == 2 and folder.get("model.norm.weight").shape == (576,)
    with pytest.raises(LowbitError, match=f"meta-llama/Llama-3.1-8B-Instruct.*HF cache {cache}"):
        resolve_model("meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(LowbitError, match="revision v2"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct@v2")


def test_cli_names_the_cache_for_a_missing_hub_id(tmp_path: Path, monkeypatch, capsys) -> None:
    from lowbit.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "org/missing-model", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "org/missing-model" in err and str(tmp_path / "empty") in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
