"""HQQ in llama.cpp's Q4_1 / Q5_1 blocks: the header is HQQ's own (scale, zero), it fits weights closer than
llama.cpp's min/max fill, and llama.cpp runs the file as lowbit computes it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamacpp_judge import both_logits

from lowbit.errors import LowbitError
from lowbit.eval.metrics import token_kld
from lowbit.formats.gguf import gguf_name_to_hf, open_gguf
from lowbit.model.forward import layer_weights
from lowbit.model.hf import ModelFolder
from lowbit.quant import hqq, hqq_blocks
from lowbit.quant.ggml_blocks import block_type
from lowbit.quant.gguf_pipeline import GGUFConfig, plan_types, quantize_to_gguf
from lowbit.quant.grid import GridConfig


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_1"])
def test_header_is_hqqs_pair(small_model_dir: Path, qtype: str) -> None:
    """gguf-py's reading of the bytes is HQQ's own reconstruction s * (q - z) on groups of 32 (real weights,
    layer 1's down projection): the same codes, and within each block one offset, the float16 rounding of
    m = -s * z (at most half its float16 spacing)."""
    w = layer_weights(ModelFolder(small_model_dir).get, ModelFolder(small_model_dir).spec, 1)["down"].float()
    bt = block_type(qtype)
    raw = hqq_blocks.quantize(bt, w.numpy())
    got = torch.from_numpy(gguf.quants.dequantize(raw, bt.ggml_type).reshape(w.shape)).reshape(w.shape[0], -1, 32)
    g = w.reshape(w.shape[0], -1, 32)
    s, z = hqq.solve(g, None, GridConfig(bt.bits, 32, False, float_zero=True), hqq_blocks.SOLVER)
    q = torch.clamp(torch.round(g / s.unsqueeze(-1) + z.unsqueeze(-1)), 0, bt.qmax)
    own = s.unsqueeze(-1) * (q - z.unsqueeze(-1))
    offset = (got - own).median(-1).values  # a code that flips at a boundary moves one weight, not the median
    m = (s * z).abs()
    print(f"\n{qtype}: largest offset {float(offset.abs().max()):.2e} (mean step {float(s.mean()):.2e})")
    assert bool((offset.abs() <= m * 2.0 ** -11 + 1e-7).all())
    same_code = ((got - own) - offset.unsqueeze(-1)).abs() < 1e-3 * s.unsqueeze(-1)
    print(f"same code as HQQ's for {float(same_code.float().mean()):.4%} of the weights")
    assert float(same_code.float().mean()) > 0.995  # the rest sit on a rounding boundary moved by m's rounding


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_1"])
def test_closer_than_llamacpps_min_max(qtype: str) -> None:
    """On Gaussian weights (seeded) HQQ's header has a lower squared error than llama.cpp's own Q4_1 / Q5_1
    fill (lowbit's BlockType.quantize, byte-identical to llama-quantize in test_gguf_blocks): 0.89x at
    both widths when written. (The embedded model's weights are no test of this: its Q4_1 is lossless
    under llama.cpp's min/max.)"""
    w = (np.random.default_rng(0).standard_normal((256, 512)) * 0.05).astype(np.float32)
    bt = block_type(qtype)
    e_hqq = float(((bt.dequantize(hqq_blocks.quantize(bt, w), 512) - w) ** 2).mean())
    e_llama = float(((bt.dequantize(bt.quantize(w, None), 512) - w) ** 2).mean())
    print(f"\n{qtype}: squared error hqq {e_hqq:.4g} vs llama.cpp {e_llama:.4g} ({e_hqq / e_llama:.3f}x)")
    assert e_hqq < 0.95 * e_llama


def test_other_types_are_refused_by_the_fit() -> None:
    with pytest.raises(ValueError, match="Q4_K cannot hold"):
        hqq_blocks.fit(block_type("Q4_K"), np.zeros((1, 256), np.float32))


def test_hqq_gguf_runs_in_llamacpp(small_model_dir: Path, tmp_path: Path) -> None:
    """llama-quantize's Q5_1 layout with HQQ's blocks, no calibration, run by llama.cpp as lowbit computes it
    from the same bytes; the same bytes again on a second run; different bytes from llama.cpp's fill."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "hqq.gguf"
    quantize_to_gguf(small_model_dir, GGUFConfig("Q5_1", "hqq"), out)
    expected = plan_types(ModelFolder(small_model_dir), GGUFConfig("Q5_1"), False)
    assert {gguf_name_to_hf(t.name)[0]: t.tensor_type.name for t in open_gguf(out).tensors} == expected
    ref, mine = both_logits(out, list(range(1, 65)))
    kld = float(token_kld(torch.log_softmax(ref, -1), mine).mean())
    print(f"llama.cpp vs lowbit on the hqq file: KLD {kld:.2e}")
    assert kld < 1e-3
    quantize_to_gguf(small_model_dir, GGUFConfig("Q5_1", "hqq"), tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == out.read_bytes()
    quantize_to_gguf(small_model_dir, GGUFConfig("Q5_1", "rtn"), tmp_path / "rtn.gguf")
    hqq_t = {t.name: bytes(t.data) for t in open_gguf(out).tensors if t.tensor_type.name == "Q5_1"}
    rtn_t = {t.name: bytes(t.data) for t in open_gguf(tmp_path / "rtn.gguf").tensors if t.tensor_type.name == "Q5_1"}
    assert hqq_t.keys() == rtn_t.keys() and all(hqq_t[n] != rtn_t[n] for n in hqq_t)


def test_method_is_checked() -> None:
    with pytest.raises(LowbitError, match="hqq"):
        GGUFConfig("Q4_K_M", "hqq2")
