"""The command line: one-line errors with exit code 2 and nothing written; JSON schema of eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowbit.cli import main


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code: int, err: str, out_path: Path, *words: str) -> None:
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:"), err
    for w in words:
        assert w in lines[0]
    assert not out_path.exists()
    assert not list(out_path.parent.glob(f".{out_path.name}.tmp-*"))


def tiny_llama_folder(path: Path, model_type: str = "llama") -> Path:
    path.mkdir()
    cfg = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32, "tie_word_embeddings": True}
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": torch.zeros(32, 64)}, str(path / "model.safetensors"))
    return path


def test_missing_model_folder(capsys, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", str(tmp_path / "nope"), "-o", str(out))
    assert_clean_failure(code, err, out, "nope", "not found")


def test_non_llama_config(capsys, tmp_path: Path) -> None:
    model = tiny_llama_folder(tmp_path / "bert", model_type="bert")
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", str(model), "-o", str(out))
    assert_clean_failure(code, err, out, "config.json", "'bert'", "llama")


@pytest.mark.parametrize("bits", ["9", "1", "abc"])
def test_bad_bits(capsys, tmp_path: Path, bits: str) -> None:
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", "--bits", bits, "-o", str(out))
    assert_clean_failure(code, err, out, "--bits")


def test_unwritable_output(capsys, tmp_path: Path, model_dir: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    code, _, err = run(capsys, "quantize", str(model_dir), "-o", str(out))
    assert code == 2 and "a-file" in err and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"


def test_existing_output_needs_overwrite(capsys, tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", str(model_dir), "-o", str(out))
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_truncated_safetensors(capsys, tmp_path: Path, model_dir: Path) -> None:
    model = tmp_path / "broken"
    model.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, model / f)
    with (model_dir / "model.safetensors").open("rb") as src:
        (model / "model.safetensors").write_bytes(src.read(5_000_000))
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", str(model), "-o", str(out))
    assert_clean_failure(code, err, out, "model.safetensors", "truncated")


def test_input_model_is_never_modified(capsys, tmp_path: Path, model_dir: Path) -> None:
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir()}
    code, _, err = run(capsys, "quantize", str(model_dir), "--bits", "3", "-o", str(tmp_path / "q"))
    assert code == 0, err
    assert before == {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir()}


def test_eval_json_schema(capsys, tmp_path: Path, model_dir: Path) -> None:
    ck = tmp_path / "q"
    assert run(capsys, "quantize", str(model_dir), "--bits", "4", "--group-size", "64", "-o", str(ck))[0] == 0
    code, out, err = run(capsys, "eval", str(ck), "--ref", str(model_dir), "--ctx", "256", "--windows", "4", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["config"] for r in rows] == ["fp32", "rtn:4:64"]
    for key in ("config", "bpw", "size_bytes", "ppl", "kld_mean", "kld_p99", "top1", "seconds"):
        assert key in rows[1]
    assert rows[0]["kld_mean"] == 0.0 and 0 < rows[1]["kld_mean"] < rows[1]["kld_p99"]
    assert rows[1]["size_bytes"] == (ck / "model.safetensors").stat().st_size


def test_bad_config_string(capsys) -> None:
    code, _, err = run(capsys, "compare", "--configs", "rtn:four:128")
    assert code == 2 and "bits 'four'" in err
