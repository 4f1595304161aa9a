"""GPTQ and AWQ on the real model with real calibration text, scored on held-out text."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from lowbit.calib.dataset import CalibConfig, build_calibration
from lowbit.calib.text import default_calib_text
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.compare import Session
from lowbit.eval.data import load_tokenizer
from lowbit.quant import pipeline
from lowbit.quant.methods import parse_config
from lowbit.quant.pipeline import quantize_checkpoint

CALIB = CalibConfig(samples=16, seqlen=256, seed=0)


@pytest.fixture(scope="module")
def calib(model_dir: Path):
    return build_calibration(load_tokenizer(model_dir), default_calib_text(), CALIB)


class _Rows(dict):
    """Whole-model quantizations, each made and scored the first time a test asks for it, so a default run
    pays only for the configs its selected tests read (each costs a whole-model quantization)."""

    def __init__(self, session: Session, model_dir: Path, calib, out: Path):
        super().__init__()
        self.session, self.model_dir, self.calib, self.out = session, model_dir, calib, out

    def __missing__(self, cfg: str):
        path = self.out / cfg.replace(":", "_")
        quantize_checkpoint(self.model_dir, parse_config(cfg), path, calib=self.calib)
        self[cfg] = self.session.score_checkpoint(path)
        return self[cfg]


@pytest.fixture(scope="module")
def rows(session: Session, model_dir: Path, calib, tmp_path_factory: pytest.TempPathFactory):
    return _Rows(session, model_dir, calib, tmp_path_factory.mktemp("calibrated"))


@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.slow)])  # AWQ's default-suite
@pytest.mark.parametrize("bits", [4, pytest.param(3, marks=pytest.mark.slow)])  # checks: test_gguf_calibrated[awq]
def test_calibrated_beats_rtn_at_equal_bits(rows, method: str, bits: int) -> None:
    ours, rtn = rows[f"{method}:{bits}:128"], rows[f"rtn:{bits}:128"]
    assert ours.bpw == rtn.bpw  # same grid, same storage: the comparison is at equal bits per weight
    assert ours.kld_mean < 0.9 * rtn.kld_mean, (ours.kld_mean, rtn.kld_mean)


@pytest.mark.slow  # one more whole-model GPTQ run
def test_act_order_no_worse(rows) -> None:
    assert rows["gptq:4:128:act"].kld_mean <= rows["gptq:4:128"].kld_mean * 1.02


def test_resume_after_crash_is_byte_identical(small_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Interrupted after layer 1's codes are on disk but before its state is: the rerun redoes layer 1
    and writes the same bytes as an uninterrupted run (real weights, first two layers: suite budget)."""
    model_dir = small_model_dir
    small = build_calibration(load_tokenizer(model_dir), default_calib_text(), CalibConfig(4, 128, seed=1))
    cfg = parse_config("gptq:3:64")
    quantize_checkpoint(model_dir, cfg, tmp_path / "straight", calib=small)

    real_save = pipeline.PartialRun._replace_save
    writes = {"acts": 0}

    def crash_mid_layer(self, tensors, path):
        if path.name == "acts.safetensors":
            writes["acts"] += 1
            if writes["acts"] == 2:  # layer 1's quantized tensors are on disk, its state is not
                raise KeyboardInterrupt
        real_save(self, tensors, path)

    monkeypatch.setattr(pipeline.PartialRun, "_replace_save", crash_mid_layer)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(model_dir, cfg, tmp_path / "resumed", calib=small)
    assert not (tmp_path / "resumed").exists()  # nothing that looks finished
    monkeypatch.setattr(pipeline.PartialRun, "_replace_save", real_save)

    done = []
    quantize_checkpoint(model_dir, cfg, tmp_path / "resumed", calib=small, after_layer=done.append)
    assert done[0] == 1  # resumed at the layer that was interrupted
    assert not (tmp_path / ".resumed.partial").exists()
    for f in sorted(p.name for p in (tmp_path / "straight").iterdir()):
        assert filecmp.cmp(tmp_path / "straight" / f, tmp_path / "resumed" / f, shallow=False), f


def test_same_seed_same_bytes(small_model_dir: Path, tmp_path: Path) -> None:
    """Same seed, same calibration draw, same checkpoint bytes (act-order GPTQ on the real first two layers)."""
    model_dir = small_model_dir
    tok = load_tokenizer(model_dir)
    a = build_calibration(tok, default_calib_text(), CalibConfig(4, 128, seed=7))
    b = build_calibration(tok, default_calib_text(), CalibConfig(4, 128, seed=7))
    c = build_calibration(tok, default_calib_text(), CalibConfig(4, 128, seed=8))
    assert a.tokens.equal(b.tokens) and not a.tokens.equal(c.tokens)
    cfg = parse_config("gptq:4:128:act")
    quantize_checkpoint(model_dir, cfg, tmp_path / "a", calib=a)
    quantize_checkpoint(model_dir, cfg, tmp_path / "b", calib=b)
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False), f


def test_too_small_calibration_file(model_dir: Path, tmp_path: Path, capsys) -> None:
    small = tmp_path / "tiny.txt"
    small.write_text("Only a few words of calibration text.")
    with pytest.raises(LowbitError, match="tiny.txt.*samples"):
        build_calibration(load_tokenizer(model_dir), small, CalibConfig(128, 512))
    out = tmp_path / "q"
    code = main(["quantize", str(model_dir), "--method", "gptq", "--calib-text", str(small), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "tiny.txt" in err and "--calib-samples" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("content,expect", [(b"\xff\xfe bad bytes", "UTF-8"), (b"   \n", "empty"),
                                            (b'{"text": 1}\n', "expected a 'text'")])
def test_bad_calibration_files(model_dir: Path, tmp_path: Path, content: bytes, expect: str) -> None:
    path = tmp_path / ("c.jsonl" if content.startswith(b"{") else "c.txt")
    path.write_bytes(content)
    with pytest.raises(LowbitError, match=expect):
        build_calibration(load_tokenizer(model_dir), path, CalibConfig(1, 16))


def test_chat_jsonl_uses_the_chat_template(model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hello there"}, '
                    '{"role": "assistant", "content": "General Kenobi"}]}\n' * 8)
    tok = load_tokenizer(model_dir)
    cal = build_calibration(tok, path, CalibConfig(2, 32))
    assert tok.convert_tokens_to_ids("<|im_start|>") in cal.tokens.tolist()[0] + cal.tokens.tolist()[1]


def test_awq_beats_rtn_on_the_first_two_real_layers(small_model_dir: Path, tmp_path: Path) -> None:
    """The default suite's AWQ quality check (the whole-model one is -m slow): on the real model cut to its
    first two layers, scored against that cut's own FP logits on held-out text, AWQ 4-bit g128 has a lower
    KLD than RTN at the same bits."""
    from lowbit.eval.compare import EvalSettings, open_session

    session = open_session(small_model_dir, EvalSettings("wiki", 256, 4))
    cal = build_calibration(load_tokenizer(small_model_dir), default_calib_text(), CALIB)
    rows = {}
    for cfg in ("awq:4:128", "rtn:4:128"):
        quantize_checkpoint(small_model_dir, parse_config(cfg), tmp_path / cfg.replace(":", "_"), calib=cal)
        rows[cfg] = session.score_checkpoint(tmp_path / cfg.replace(":", "_"))
    awq, rtn = rows["awq:4:128"], rows["rtn:4:128"]
    print(f"\n2 layers: awq KLD {awq.kld_mean:.4g} vs rtn {rtn.kld_mean:.4g}")
    assert awq.bpw == rtn.bpw and awq.kld_mean < 0.9 * rtn.kld_mean
