"""The importance matrix: values checked against transformers, file accepted by llama.cpp's quantizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.calib.dataset import CalibConfig, build_calibration
from lowbit.calib.imatrix import compute_imatrix
from lowbit.calib.text import default_calib_text
from lowbit.eval.data import load_tokenizer
from lowbit.formats.gguf import hf_folder_to_gguf
from lowbit.formats.imatrix import read_imatrix, write_imatrix_gguf, write_imatrix_lowbit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def calib(model_dir: Path):
    return build_calibration(load_tokenizer(model_dir), default_calib_text(), CalibConfig(4, 128, seed=3))


@pytest.fixture(scope="module")
def imatrix(model_dir: Path, calib):
    return compute_imatrix(model_dir, calib)


def test_imatrix_matches_transformers_activations(model_dir: Path, calib, imatrix) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        hidden = model(calib.tokens, output_hidden_states=True).hidden_states
        for layer in (0, 17):
            x = model.model.layers[layer].input_layernorm(hidden[layer]).reshape(-1, 576).double()
            e = imatrix[f"model.layers.{layer}.self_attn.k_proj.weight"]
            assert e.count == calib.tokens.numel()
            np.testing.assert_allclose(e.in_sum2, x.pow(2).sum(0).numpy(), rtol=2e-3)


def test_both_formats_round_trip(imatrix, tmp_path: Path) -> None:
    write_imatrix_gguf(tmp_path / "im.gguf", imatrix, ["wiki"], 4, 128)
    write_imatrix_lowbit(tmp_path / "im.safetensors", imatrix, {"samples": 4})
    for path in (tmp_path / "im.gguf", tmp_path / "im.safetensors"):
        back = read_imatrix(path)
        assert set(back) == set(imatrix) and len(back) == 7 * 30
        name = "model.layers.9.mlp.down_proj.weight"
        assert np.array_equal(back[name].in_sum2, imatrix[name].in_sum2) and back[name].count == imatrix[name].count


def test_llama_cpp_quantizer_accepts_our_imatrix(model_dir: Path, imatrix, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    f32 = hf_folder_to_gguf(model_dir, tmp_path / "f32.gguf")
    write_imatrix_gguf(tmp_path / "im.gguf", imatrix, ["wiki"], 4, 128)
    script = ROOT / "benchmarks" / "peers" / "llamacpp_quantize.py"
    outs = {}
    for label, extra in (("plain", []), ("imatrix", [str(tmp_path / "im.gguf")])):
        outs[label] = tmp_path / f"{label}.gguf"
        run = subprocess.run([sys.executable, str(script), str(f32), str(outs[label]), "Q4_K_M", *extra],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    # The importance weights must change llama.cpp's choices of scales (and so the bytes) ...
    assert outs["plain"].read_bytes() != outs["imatrix"].read_bytes()
    # ... but not the layout: same size, same tensor types.
    assert outs["plain"].stat().st_size == outs["imatrix"].stat().st_size
