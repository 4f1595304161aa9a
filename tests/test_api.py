"""The Python API the CLI stands on: lowbit.quantize writes what `lowbit quantize` writes, byte for byte, takes every
kind of compare's grammar (GGUF AutoRound and HQQ among them), and refuses bad input in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError

CALIB = {"calib_samples": 8, "calib_seqlen": 64}
CLI_CALIB = ["--calib-samples", "8", "--calib-seqlen", "64"]


def _files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("config, cli", [
    ("gguf:Q4_K_M:hqq", ["--format", "gguf", "--type", "Q4_K_M", "--method", "hqq"]),
    ("gguf:Q3_K_M:autoround", ["--format", "gguf", "--type", "Q3_K_M", "--method", "autoround", *CLI_CALIB]),
    ("gptq:4:64:act", ["--method", "gptq", "--bits", "4", "--group-size", "64", "--act-order", *CLI_CALIB]),
])
def test_quantize_writes_what_the_cli_writes(small_model_dir, tmp_path, config, cli):
    suffix = ".gguf" if config.startswith("gguf:") else ""
    ours = tmp_path / f"api{suffix}"
    theirs = tmp_path / f"cli{suffix}"
    res = lowbit.quantize(small_model_dir, config, ours, **CALIB)
    assert (res["config"], res["path"]) == (config, str(ours)) and res["seconds"] > 0
    assert main(["quantize", str(small_model_dir), *cli, "-o", str(theirs)]) == 0
    mine, cli_files = _files(ours), _files(theirs)
    assert mine == {(f"api{suffix}" if k == f"cli{suffix}" else k): v for k, v in cli_files.items()}


def test_quantize_refuses_bad_input_before_any_work(small_model_dir, tmp_path):
    with pytest.raises(LowbitError, match=r"\*\.gguf"):
        lowbit.quantize(small_model_dir, "gguf:Q4_K_M", tmp_path / "model.bin")
    with pytest.raises(LowbitError, match="unknown GGUF method 'signround'"):
        lowbit.quantize(small_model_dir, "gguf:Q4_K_M:signround", tmp_path / "m.gguf")
    with pytest.raises(LowbitError, match="drop ':plan'"):
        lowbit.quantize(small_model_dir, "gguf:Q4_K_M:hqq:plan", tmp_path / "m.gguf")
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    with pytest.raises(LowbitError, match="--overwrite"):
        lowbit.quantize(small_model_dir, "gguf:Q4_K_M", taken)
    assert taken.read_bytes() == b"mine"


def test_compare_takes_gguf_autoround_and_hqq(small_model_dir, tmp_path):
    """Both new GGUF methods measured beside llama.cpp's own search, the HQQ row equal to evaluating the file
    lowbit.quantize writes for it, and AutoRound's learned rounding below llama.cpp's search without an imatrix."""
    calib = lowbit.calibration(small_model_dir, samples=8, seqlen=64)
    rows = lowbit.compare(small_model_dir, "gguf:Q4_K_M,gguf:Q4_K_M:hqq,gguf:Q4_K_M:autoround", ctx=128, windows=2,
                          calib=calib)
    by = {r["config"]: r for r in rows}
    assert set(by) == {"fp32", "gguf:Q4_K_M", "gguf:Q4_K_M:hqq", "gguf:Q4_K_M:autoround"}
    hqq_file = tmp_path / "hqq.gguf"
    lowbit.quantize(small_model_dir, "gguf:Q4_K_M:hqq", hqq_file)
    alone = lowbit.evaluate(hqq_file, ref=small_model_dir, ctx=128, windows=2)[1]
    assert alone["kld_mean"] == by["gguf:Q4_K_M:hqq"]["kld_mean"]
    assert by["gguf:Q4_K_M:autoround"]["kld_mean"] < by["gguf:Q4_K_M"]["kld_mean"]
