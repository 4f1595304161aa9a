"""--format mlx against mlx 0.32.4 + mlx-lm 0.32.2 in their own venv (opt-in: -m consumers;
benchmarks/peers/setup_peer_venvs.sh mlx builds it).

  * mlx_lm.load reads lowbit's MLX folders strictly; every weight mx.dequantize computes equals lowbit's reader
    bit for bit, and mlx_lm's logits on real text match lowbit's float32 forward (KLD < 1e-3): the real model
    (all 30 layers, and 2 layers at 8-bit), and a float16 Qwen2 family model (q/k/v biases, tied embedding);
  * `--method mlx` (mx.quantize's formula, reproduced) gives mlx_lm.convert's tensors byte for byte;
  * lowbit's own RTN is another grid than mx.quantize's: how far its bytes are from mlx_lm.convert's is printed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from consumer_checks import same_weights_and_kld
from safetensors import safe_open

from lowbit.formats import mlx
from lowbit.quant.grid import GridConfig
from lowbit.quant.methods import QuantConfig
from lowbit.quant.pipeline import quantize_checkpoint

pytestmark = pytest.mark.consumers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "consumers" / "mlx_load.py"


def venv_python() -> Path:
    python = ROOT / "benchmarks" / ".venvs" / "mlx" / "bin" / "python"
    if not python.exists():
        pytest.skip("no mlx venv: run benchmarks/peers/setup_peer_venvs.sh mlx")
    return python


def family(name: str, out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from families import build_family_model

    return build_family_model(name, out)


@pytest.fixture(scope="module")
def sources(model_dir: Path, small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"real": model_dir, "real-2l": small_model_dir,
            "qwen2": family("qwen2", tmp_path_factory.mktemp("mlx-src") / "qwen2")}


@pytest.fixture(scope="module")
def folders(sources, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """lowbit MLX folders: RTN 4-bit g64 asymmetric with the embedding quantized (the tied head with it, as
    mlx_lm.convert does) on the real model and on Qwen2; RTN 8-bit g128 symmetric on the real model's 2 layers;
    HQQ 4-bit g64 with float zeros (MLX's bias = -zero*scale) on the same 2 layers."""
    root = tmp_path_factory.mktemp("mlx")
    plans = {"real-w4g64a": ("real", QuantConfig("rtn", GridConfig(4, 64, False), True, False)),
             "real-2l-w8g128": ("real-2l", QuantConfig("rtn", GridConfig(8, 128, True))),
             "qwen2-w4g64a": ("qwen2", QuantConfig("rtn", GridConfig(4, 64, False), True, False)),
             "real-2l-hqq-w4g64af": ("real-2l", QuantConfig("hqq", GridConfig(4, 64, False, float_zero=True)))}
    out = {}
    for which, (src, qcfg) in plans.items():
        quantize_checkpoint(sources[src], qcfg, root / f"{which}-ck")
        mlx.export_mlx(root / f"{which}-ck", root / which)
        out[which] = root / which
    return out


def tensors(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.parametrize("which", ["real-w4g64a", "real-2l-w8g128", "qwen2-w4g64a", "real-2l-hqq-w4g64af"])
def test_mlx_lm_loads_lowbit_folders(folders, session, tmp_path: Path, which: str) -> None:
    from safetensors.torch import load_file


    ours = mlx.MLXWeights(folders[which])
    tokens = session.windows.tokens[:2, :128] % ours.spec.vocab_size
    np.savez(tmp_path / "tokens.npz", tokens=tokens.numpy().astype(np.int32))
    run = subprocess.run([str(venv_python()), str(SCRIPT), "load", str(folders[which]), str(tmp_path / "tokens.npz"),
                          str(tmp_path / "out.safetensors")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    kld = same_weights_and_kld(load_file(tmp_path / "out.safetensors"), ours, tokens)
    print(f"\n{which}: KLD lowbit forward vs mlx_lm {kld:.2e}; {run.stdout.strip()}")
    assert kld < 1e-3


@pytest.mark.parametrize("src,bits", [("real-2l", 4), ("real-2l", 8), ("qwen2", 4)])
def test_method_mlx_equals_mlx_lm_convert(sources, tmp_path: Path, src: str, bits: int) -> None:
    """lowbit's reproduction of mx.quantize writes mlx_lm.convert's tensors byte for byte (same names, dtypes,
    shapes, bytes; the embedding quantized, a tied head dropped, float16 kept for the family model)."""
    subprocess.run([str(venv_python()), str(SCRIPT), "convert", str(sources[src]), str(tmp_path / "conv"), str(bits),
                    "64"], check=True, capture_output=True)
    mlx.quantize_model_mlx(sources[src], tmp_path / "ours", bits, 64)
    ref, ours = tensors(tmp_path / "conv"), tensors(tmp_path / "ours")
    assert sorted(ref) == sorted(ours)
    for name in ref:
        assert ref[name].dtype == ours[name].dtype and ref[name].shape == ours[name].shape, name
        assert ref[name].tobytes() == ours[name].tobytes(), name


def test_lowbit_rtn_against_mlx_lm_convert(sources, tmp_path: Path) -> None:
    """lowbit's RTN (integer zero, float16 scale fitted to [min(w,0), max(w,0)]) and mx.quantize (bias = the
    group's extreme, float32 scale bent to put 0 on the grid) are different grids: the files have the same
    tensors, shapes and dtypes, the codes mostly agree, and the bytes of the scales and biases differ."""
    src = sources["real-2l"]
    subprocess.run([str(venv_python()), str(SCRIPT), "convert", str(src), str(tmp_path / "conv"), "4", "64"],
                   check=True, capture_output=True)
    quantize_checkpoint(src, QuantConfig("rtn", GridConfig(4, 64, False), True, False), tmp_path / "ck")
    mlx.export_mlx(tmp_path / "ck", tmp_path / "ours")
    ref, ours = tensors(tmp_path / "conv"), tensors(tmp_path / "ours")
    assert sorted(ref) == sorted(ours)
    conv, lb = mlx.MLXWeights(tmp_path / "conv"), mlx.MLXWeights(tmp_path / "ours")
    same_codes = total = same_bytes = nbytes = 0
    rel = []
    for name in conv.quantized_names:
        assert ref[name].shape == ours[name].shape and ref[name].dtype == ours[name].dtype
        a, b = conv.parts(name)[0], lb.parts(name)[0]
        same_codes += int((a == b).sum())
        total += a.numel()
        for t in (name, name.replace(".weight", ".scales"), name.replace(".weight", ".biases")):
            same_bytes += int((ref[t].view(np.uint8) == ours[t].view(np.uint8)).sum())
            nbytes += ref[t].nbytes
        diff = (conv.tensor(name) - lb.tensor(name)).abs().mean() / conv.tensor(name).abs().mean()
        rel.append(float(diff))
    print(f"\nlowbit RTN w4g64 asym vs mlx_lm.convert: codes equal {same_codes / total:.4f}, bytes equal "
          f"{same_bytes / nbytes:.4f}, mean |dW| / mean |W| {np.mean(rel):.4f}")
    assert 0.5 < same_codes / total < 1.0
