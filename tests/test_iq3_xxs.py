"""IQ3_XXS (lowbit.quant.ggml_blocks.IQ3_XXS) against llama.cpp and gguf-py.

The block type is not registered in TYPES nor offered as a GGUF file type yet: its numpy search is exact
but slow (~20-30 us per weight), and llama.cpp's IQ3_XXS mix needs IQ3_S and IQ2_S, which lowbit lacks.

  * its grid (generated from ggml-quants.c's kgrid_256 and the level bytes) equals gguf-py's IQ3_XXS grid;
  * llama_model_quantize's IQ3_XXS (which requires an imatrix) on a 1-layer synthetic Llama: every block of
    every IQ3_XXS tensor equals lowbit's;
  * gguf-py's dequantization of lowbit's blocks equals lowbit's, and unpack/pack round-trips.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from test_ggml_blocks import bits, imatrix_for, random_importance, sample_weights, synthetic_f32_gguf

from lowbit.quant.ggml_blocks import IQ3_XXS
from lowbit.quant.ggml_iq_grids import IQ3XXS_BYTES, IQ3XXS_KGRID


def test_grid_equals_gguf_py() -> None:
    if gguf.quants.IQ3_XXS.grid is None:
        gguf.quants.IQ3_XXS.init_grid()
    levels = (IQ3XXS_KGRID[:, None].astype(int) >> (3 * np.arange(4))) & 7
    assert np.array_equal(IQ3XXS_BYTES[levels].ravel(), np.asarray(gguf.quants.IQ3_XXS.grid).ravel())


def test_dequantize_equals_gguf_py_and_round_trips() -> None:
    t = IQ3_XXS()
    rng = np.random.default_rng(1)
    w = sample_weights(rng, 24, 512)
    raw = t.quantize(w, random_importance(rng, 512))
    assert np.array_equal(bits(t.dequantize(raw, 512)), bits(gguf.quants.dequantize(raw, t.ggml_type)))
    params, codes = t.unpack(raw, 512)
    assert np.array_equal(t.pack(params, codes), raw)


@pytest.mark.slow  # ~10-20 s: the numpy search is slow (no compiled port yet)
def test_blocks_equal_llama_model_quantize(tmp_path) -> None:
    pytest.importorskip("llama_cpp")
    from lowbit.peers.llamacpp import llamacpp_quantize

    src = tmp_path / "f32.gguf"
    f32, importance = synthetic_f32_gguf(src, np.random.default_rng(2), layers=1, ffn=256)
    out = llamacpp_quantize(src, tmp_path / "iq3_xxs.gguf", "IQ3_XXS", imatrix_for(importance))
    t = IQ3_XXS()
    same = total = 0
    names = []
    for tensor in gguf.GGUFReader(str(out)).tensors:
        if tensor.tensor_type.name != "IQ3_XXS":
            continue
        names.append(tensor.name)
        ours = t.quantize(f32[tensor.name], importance[tensor.name]).reshape(-1, t.bytes_per_block)
        theirs = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, t.bytes_per_block)
        same += int((ours == theirs).all(1).sum())
        total += ours.shape[0]
    print(f"IQ3_XXS: {same}/{total} blocks identical to llama.cpp over {names}")
    assert names and same == total
