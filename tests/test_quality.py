"""Quality on the real model and real held-out text, scored from checkpoints written to disk."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import torch

from lowbit.eval.compare import Session
from lowbit.formats.lowbit_ckpt import LowbitCheckpoint
from lowbit.model.hf import ModelFolder
from lowbit.quant.grid import GridConfig, quantize_rtn
from lowbit.quant.methods import QuantConfig, parse_config
from lowbit.quant.pipeline import quantize_checkpoint


@pytest.fixture(scope="module")
def rtn_rows(session: Session, model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("rtn")
    rows = {}
    for bits in (8, 4, 3, 2):
        cfg = parse_config(f"rtn:{bits}:128")
        quantize_checkpoint(model_dir, cfg, out / str(bits))
        rows[bits] = session.score_checkpoint(out / str(bits))
    return rows


def test_kld_monotone_in_bits(rtn_rows) -> None:
    kld = [rtn_rows[b].kld_mean for b in (8, 4, 3, 2)]
    assert kld[0] < kld[1] < kld[2] < kld[3], kld
    top1 = [rtn_rows[b].top1 for b in (8, 4, 3, 2)]
    assert top1[0] > top1[1] > top1[2] > top1[3], top1


def test_8bit_is_near_lossless_and_fp_ppl_is_sane(session: Session, rtn_rows) -> None:
    fp = session.fp_row()
    assert 5 < fp.ppl < 40  # a real 135M model on real Wikipedia text
    assert rtn_rows[8].kld_mean < 0.01
    assert abs(rtn_rows[8].ppl - fp.ppl) < 0.02 * fp.ppl


def test_checkpoint_bits_are_what_was_counted(rtn_rows) -> None:
    # 576-wide rows at g128 have 5 groups: 4 + 5*16/576 bits; 1536-wide rows 4 + 16/128.
    assert rtn_rows[4].bpw == pytest.approx(4.1354, abs=1e-4)
    assert rtn_rows[3].bpw == pytest.approx(rtn_rows[4].bpw - 1)


def test_checkpoint_round_trip_is_exact(model_dir: Path, tmp_path: Path) -> None:
    cfg = QuantConfig("rtn", GridConfig(3, 64, symmetric=False))
    quantize_checkpoint(model_dir, cfg, tmp_path / "ck")
    ck = LowbitCheckpoint(tmp_path / "ck")
    name = "model.layers.5.self_attn.k_proj.weight"
    expected = quantize_rtn(ModelFolder(model_dir).get(name), cfg.grid)
    got = ck.quantized(name)
    assert torch.equal(got.codes, expected.codes)
    assert torch.equal(got.scales, expected.scales)
    assert torch.equal(got.zeros, expected.zeros)
    norm = "model.layers.5.input_layernorm.weight"
    assert torch.equal(ck.tensor(norm), ModelFolder(model_dir).get(norm))


def test_same_inputs_give_byte_identical_checkpoints(model_dir: Path, tmp_path: Path) -> None:
    cfg = parse_config("rtn:4:64:asym")
    quantize_checkpoint(model_dir, cfg, tmp_path / "a")
    quantize_checkpoint(model_dir, cfg, tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in names:
        assert filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False), f
