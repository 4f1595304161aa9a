"""bitsandbytes NF4 / INT8: the grids, GPTQ onto them, the folder lowbit writes and reads back.

The real consumer (transformers + bitsandbytes, in its own venv) is in tests/test_consumers_methods.py
(-m consumers): it loads these folders and checks weights bit for bit and logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.bnb import BnbWeights
from lowbit.model.hf import ModelFolder
from lowbit.quant import int8, nf4
from lowbit.quant.bnb_pipeline import BnbConfig, quantize_to_bnb
from lowbit.quant.gptq import GPTQConfig
from lowbit.quant.gptq_codebook import factor, quantize_codebook_gptq
from test_gptq import hessian, layer, out_err


def test_dynamic_map_is_bitsandbytes_layout() -> None:
    """256 sorted entries in [-1, 1] with 0 and 1.0; 2^i fraction midpoints per decade 1e-6 .. 1, both signs."""
    m = nf4.dynamic_map()
    assert m.shape == (256,) and bool((m[1:] >= m[:-1]).all())
    assert float(m[-1]) == 1.0 and float(m.abs().max()) == 1.0 and 0.0 in m.tolist()
    positive = m[m > 0]
    assert len(positive) == 128 and float(positive.min()) == pytest.approx(5.5e-7, rel=1e-6)
    assert int(((positive >= 0.1) & (positive < 1)).sum()) == 64  # the top decade has 64 fraction midpoints


def test_nf4_levels_are_normal_quantiles() -> None:
    """NF4's definition (QLoRA): 8 positive levels at normal quantiles of (0.5, 0.9677] and 7 negative ones, each
    side normalised to 1, plus an exact 0. Checked against the inverse normal CDF, to the table's float32."""
    from statistics import NormalDist

    offset = 0.9677083
    pos = [NormalDist().inv_cdf(0.5 + (offset - 0.5) * i / 8) for i in range(1, 9)]
    neg = [-NormalDist().inv_cdf(0.5 + (offset - 0.5) * i / 7) for i in range(1, 8)]
    levels = sorted([v / pos[-1] for v in pos] + [v / -neg[-1] for v in neg] + [0.0])
    assert torch.allclose(nf4.NF4_LEVELS, torch.tensor(levels, dtype=torch.float32), atol=2e-6)


def test_double_quantized_absmax_decodes_close() -> None:
    """Each decoded absmax is within half the map's coarsest step (1/64 of a decade near 1, 0.9/64) of the
    exact one, measured in units of its 256-block's nested absmax."""
    w = torch.randn(256, 1024) * torch.logspace(-2, 0, 1024)
    qt = nf4.quantize_rtn(w)
    exact = nf4.block_absmax(w)
    unit = qt.nested_absmax.repeat_interleave(nf4.NESTED_BLOCK)[:exact.numel()]
    assert bool(((qt.absmax() - exact).abs() <= unit * 0.9 / 64 / 2 * 1.0001).all())
    assert qt.dequantize().shape == w.shape and bool((qt.codes < 16).all())


@pytest.mark.parametrize("grid", ["nf4", "int8"])
def test_gptq_on_codebook_beats_rtn(grid: str) -> None:
    """Correlated inputs: GPTQ's codes, with the very scales RTN uses, have a lower output error, and act-order
    helps again (fixed scales make it free: no g_idx)."""
    x, w = layer(256, out=96, n=2048, seed=1)
    w = w.float()
    h = hessian(x)
    if grid == "nf4":
        rtn = nf4.quantize_rtn(w)
        scales, cb, deq = rtn.absmax().reshape(96, -1), nf4.NF4Grid(), lambda c: nf4.NF4Tensor(
            c.to(torch.uint8), rtn.absmax_codes, rtn.nested_absmax, rtn.offset, rtn.qmap).dequantize()
    else:
        rtn = int8.quantize_rtn(w)
        scales, cb, deq = rtn.scb, int8.Int8Grid(), lambda c: int8.Int8Tensor(c, rtn.scb).dequantize()
    errs = {}
    for act in (False, True):
        g = GPTQConfig(act_order=act)
        errs[act] = out_err(x, w, deq(quantize_codebook_gptq(w, factor(h, 256, "w", g), scales, cb, g)))
    e_rtn = out_err(x, w, rtn.dequantize())
    assert errs[False] < 0.8 * e_rtn, (errs, e_rtn)
    assert errs[True] < errs[False]


@pytest.fixture(scope="module")
def folders(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bnbfolders")
    out = {}
    for kind in ("nf4", "int8"):
        out[kind] = root / kind
        quantize_to_bnb(small_model_dir, BnbConfig(kind, "rtn"), out[kind])
    return out


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_folder_round_trip_and_nothing_dropped(folders, small_model_dir: Path, kind: str) -> None:
    src = ModelFolder(small_model_dir)
    ours = BnbWeights(folders[kind])
    assert len(ours.quantized_names) == 14
    for name in src.names():
        if name in ours.quantized_names:
            q = nf4.quantize_rtn(src.get(name)) if kind == "nf4" else int8.quantize_rtn(src.get(name))
            assert torch.equal(ours.tensor(name), q.dequantize()), name
        else:
            assert torch.equal(ours.tensor(name), src.get(name)), name
    qc = json.loads((folders[kind] / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] == (kind == "nf4")
    assert qc["bnb_4bit_use_double_quant"] == (kind == "nf4")
    assert (folders[kind] / "tokenizer.json").is_file()


def test_reproducible_bytes(folders, small_model_dir: Path, tmp_path: Path) -> None:
    quantize_to_bnb(small_model_dir, BnbConfig("nf4", "rtn"), tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (folders["nf4"] / "model.safetensors").read_bytes()


def test_scored_as_an_artifact(folders, small_model_dir: Path) -> None:
    from lowbit.eval.compare import artifact_kind, open_artifact

    assert artifact_kind(folders["int8"]) == "bnb"
    assert isinstance(open_artifact(folders["nf4"]), BnbWeights)


def test_refusals_are_one_line(small_model_dir: Path, tmp_path: Path, capsys) -> None:
    from lowbit.cli import main

    code = main(["quantize", str(small_model_dir), "--format", "bnb", "--bits", "3", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--bits 4 or --bits 8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    with pytest.raises(LowbitError, match="calibration"):
        quantize_to_bnb(small_model_dir, BnbConfig("nf4", "gptq"), tmp_path / "y")
    with pytest.raises(LowbitError, match="--method"):
        BnbConfig("nf4", "awq")


def test_compare_candidates_parse() -> None:
    from lowbit.pipeline.candidates import parse_candidate

    c = parse_candidate("bnb:nf4:gptq")
    assert (c.kind, c.bnb_kind, c.method, c.needs_calibration) == ("bnb", "nf4", "gptq", True)
    assert not parse_candidate("bnb:int8").needs_calibration
    for bad in ("bnb:fp4", "bnb:nf4:awq", "bnb"):
        with pytest.raises(LowbitError, match="bnb:nf4"):
            parse_candidate(bad)
