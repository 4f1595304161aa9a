"""The methods of issue 13 against their reference packages, each in its own venv (opt-in: -m consumers).

  * hqq 0.2.8: lowbit's `hqq.reference_quantize` is the package's algorithm read from its paper and code;
    on real weights its codes, scales and zeros must equal what hqq's own Quantizer computes. lowbit's
    `hqq` method departs from it on purpose (integer zeros, a scale step; see quant/hqq.py), so this is
    the check that the departure starts from the right place.
  * bitsandbytes 0.50.2: transformers loads lowbit's NF4/INT8 folders; the weights equal lowbit's reader.
  * aqlm 1.1.7: transformers loads lowbit's AQLM folders (2x8 and 1x16, real model and families); the weights
    equal lowbit's reader and the logits its forward.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from consumer_checks import same_weights_and_kld
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


# ---------------------------------------------------------------- bitsandbytes NF4 and INT8


@pytest.fixture(scope="module")
def bnb_folders(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lowbit.calib.dataset import CalibConfig, build_calibration
    from lowbit.calib.text import default_calib_text
    from lowbit.eval.data import load_tokenizer
    from lowbit.quant.bnb_pipeline import BnbConfig, quantize_to_bnb

    root = tmp_path_factory.mktemp("bnb")
    calib = build_calibration(load_tokenizer(model_dir), default_calib_text(), CalibConfig(8, 256, seed=0))
    out = {}
    for kind, method in (("nf4", "rtn"), ("nf4", "gptq"), ("int8", "rtn"), ("int8", "gptq")):
        out[f"{kind}-{method}"] = root / f"{kind}-{method}"
        quantize_to_bnb(model_dir, BnbConfig(kind, method), out[f"{kind}-{method}"],
                        calib=calib if method == "gptq" else None)
    return out


@pytest.mark.parametrize("which", ["nf4-rtn", "nf4-gptq", "int8-rtn", "int8-gptq"])
def test_transformers_bitsandbytes_loads_lowbit_folders(bnb_folders, session, tmp_path: Path, which: str) -> None:
    """transformers + bitsandbytes 0.50.2 load the folder with no missing or unexpected keys; every quantized
    weight it dequantizes equals lowbit's reader bit for bit; NF4 logits match lowbit's float32 forward
    (KLD < 1e-3). INT8 runs LLM.int8's int8 activations, so its logits are only required to stay close."""
    from lowbit.formats.bnb import BnbWeights

    tokens = session.windows.tokens[:2]
    save_file({"tokens": tokens.contiguous()}, tmp_path / "tokens.safetensors")
    run = subprocess.run([str(venv_python("bnb")), str(ROOT / "tests" / "consumers" / "bnb_load.py"),
                          str(bnb_folders[which]), str(tmp_path / "tokens.safetensors"), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "missing" not in log.lower() and "unexpected" not in log.lower(), log[-2000:]
    theirs = load_file(tmp_path / "out.safetensors")
    kld = same_weights_and_kld(theirs, BnbWeights(bnb_folders[which]), tokens)
    print(f"\n{which}: KLD lowbit forward vs transformers+bitsandbytes {kld:.2e}")
    assert kld < (1e-3 if which.startswith("nf4") else 0.05)


def test_lowbit_rtn_is_bitsandbytes_own_quantizer(bnb_folders, model_dir: Path, tmp_path: Path) -> None:
    """bitsandbytes quantizes the same model on load and saves it (before any forward); lowbit's rtn folders
    must hold the same bytes: INT8 all of them; NF4 every weight code, offset, nested absmax and map. The 8-bit
    absmax codes may differ where bitsandbytes' C lookup does not return the nearest map entry: there
    lowbit's entry must be the nearer one, and such blocks must stay under 0.5%."""
    from lowbit.model.hf import ModelFolder
    from lowbit.quant import nf4

    folder = ModelFolder(model_dir)
    script = tmp_path / "save.py"
    script.write_text(
        "import sys, torch\nfrom transformers import AutoModelForCausalLM, BitsAndBytesConfig\n"
        "src, dst, kind = sys.argv[1:4]\n"
        "q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, "
        "bnb_4bit_compute_dtype=torch.float32) if kind == 'nf4' else BitsAndBytesConfig(load_in_8bit=True)\n"
        "AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.float32, "
        "device_map='cpu').save_pretrained(dst)\n")
    for kind in ("int8", "nf4"):
        subprocess.run([str(venv_python("bnb")), str(script), str(model_dir), str(tmp_path / kind), kind], check=True,
                       capture_output=True)
        ref = load_file(tmp_path / kind / "model.safetensors")
        ours = load_file(bnb_folders[f"{kind}-rtn"] / "model.safetensors")
        assert sorted(ref) == sorted(ours)
        off = total = 0
        for name in ref:
            if kind == "nf4" and name.endswith(".weight.absmax"):
                differ = ref[name] != ours[name]
                off += int(differ.sum())
                total += ref[name].numel()
                absmax = nf4.block_absmax(folder.get(name.removesuffix(".absmax")))
                centred = absmax - absmax.mean()
                nested = ours[name.replace(".absmax", ".nested_absmax")].repeat_interleave(nf4.NESTED_BLOCK)
                x = torch.clamp(centred * (1 / nested[:centred.numel()]), -1, 1)
                qmap = ours[name.replace(".absmax", ".nested_quant_map")]
                assert bool(((x - qmap[ours[name].long()]).abs() <= (x - qmap[ref[name].long()]).abs()).all()), name
            else:
                assert ref[name].dtype == ours[name].dtype and torch.equal(ref[name], ours[name]), name
        if kind == "nf4":
            print(f"\nNF4 absmax codes differing from bitsandbytes': {off} of {total}")
            assert off < 0.005 * total


@pytest.fixture(scope="module")
def aqlm_folders(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """lowbit AQLM folders: the real model (2 layers) at 2x8, a Qwen2 family model (q/k/v biases) at 2x8, and a
    Llama 3 family model shrunk to hidden 64 at 1x16 (65536-entry codebooks; small so the CPU search is quick)."""
    import sys

    from lowbit.calib.dataset import CalibConfig, build_calibration
    from lowbit.calib.text import default_calib_text
    from lowbit.eval.data import load_tokenizer
    from lowbit.quant.aqlm import AQLMConfig
    from lowbit.quant.aqlm_pipeline import quantize_to_aqlm

    sys.path.insert(0, str(ROOT / "tests"))
    from families import build_family_model

    root = tmp_path_factory.mktemp("aqlm")
    sources = {"real-2x8": small_model_dir, "qwen2-2x8": build_family_model("qwen2", root / "qwen2"),
               "llama3-1x16": build_family_model("llama3", root / "llama3", overrides={
                   "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2})}
    out = {}
    for which, src in sources.items():
        ncb, nbits = (1, 16) if which.endswith("1x16") else (2, 8)
        calib = build_calibration(load_tokenizer(src), default_calib_text(), CalibConfig(8, 128, seed=0))
        out[which] = root / f"{which}-out"
        quantize_to_aqlm(src, AQLMConfig(ncb, nbits, beam=2, rounds=1, cg_iters=3, kmeans_iters=4), out[which],
                         calib=calib)
    return out


@pytest.mark.parametrize("which", ["real-2x8", "qwen2-2x8", "llama3-1x16"])
def test_transformers_aqlm_loads_lowbit_folders(aqlm_folders, session, tmp_path: Path, which: str) -> None:
    """transformers 5.24 + aqlm 1.1.7 load the folder with no missing or unexpected keys; every weight aqlm
    dequantizes equals lowbit's reader bit for bit, and its logits (through aqlm's own kernels: numba LUT for
    2x8, dequantize-then-matmul for 1x16) match lowbit's float32 forward: KLD < 1e-3."""
    import os

    from lowbit.formats.aqlm import AQLMWeights

    ours = AQLMWeights(aqlm_folders[which])
    tokens = session.windows.tokens[:2, :128] % ours.spec.vocab_size
    save_file({"tokens": tokens.contiguous()}, tmp_path / "tokens.safetensors")
    run = subprocess.run([str(venv_python("aqlm")), str(ROOT / "tests" / "consumers" / "aqlm_load.py"),
                          str(aqlm_folders[which]), str(tmp_path / "tokens.safetensors"),
                          str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True, env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "missing" not in log.lower() and "unexpected" not in log.lower() and "WARNING" not in log, log[-2000:]
    kld = same_weights_and_kld(load_file(tmp_path / "out.safetensors"), ours, tokens)
    print(f"\n{which}: KLD lowbit forward vs transformers+aqlm {kld:.2e}")
    assert kld < 1e-3
