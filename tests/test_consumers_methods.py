"""The methods of issue 13 against their reference packages, each in its own venv (opt-in: -m consumers).

  * hqq 0.2.8: lowbit's `hqq.reference_quantize` is the package's algorithm read from its paper and code;
    on real weights its codes, scales and zeros must equal what hqq's own Quantizer computes. lowbit's
    `hqq` method departs from it on purpose (integer zeros, a scale step; see quant/hqq.py), so this is
    the check that the departure starts from the right place.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.model.hf import ModelFolder
from lowbit.quant import hqq

pytestmark = pytest.mark.consumers

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "benchmarks" / ".venvs"
NAMES = ("model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight",
         "model.layers.11.mlp.gate_proj.weight")


def venv_python(name: str) -> Path:
    python = VENVS / name / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no {name} venv: run benchmarks/peers/setup_peer_venvs.sh {name} (make consumers does)")
    return python


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 64), (2, 32)])
def test_hqq_reference_equals_the_package(model_dir: Path, tmp_path: Path, bits: int, group: int) -> None:
    folder = ModelFolder(model_dir)
    weights = {n: folder.get(n).float().contiguous() for n in NAMES}
    save_file(weights, tmp_path / "in.safetensors")
    subprocess.run([str(venv_python("hqq")), str(ROOT / "tests" / "consumers" / "hqq_reference.py"),
                    str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"), str(bits), str(group)],
                   check=True)
    theirs = load_file(tmp_path / "out.safetensors")
    for name, w in weights.items():
        q, scale, zero = hqq.reference_quantize(w, bits, group)
        assert torch.equal(q, theirs[f"{name}.codes"].reshape(q.shape)), name
        assert torch.equal(zero, theirs[f"{name}.zero"].reshape(zero.shape)), name
        assert torch.equal(scale, theirs[f"{name}.scale"].reshape(scale.shape)), name
