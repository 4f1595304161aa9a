"""GPTQ and AWQ exports loaded by transformers + optimum + gptqmodel 7.6.0 on CPU (opt-in: -m consumers).

gptqmodel lives in its own venv (benchmarks/peers/setup_peer_venvs.sh gptqmodel, which `make consumers`
runs): installing it into lowbit's venv would add optimum, datasets and friends for two tests, and its
first load is slow. A script in that venv (tests/consumers/gptqmodel_load.py) loads every export the
way a user does and dumps each quantized linear's dequantized weight and the logits on real held-out
windows; this test compares them with lowbit's own checkpoint:

  * weights: the loader computes scale * (code - zero) in float16 (its scales' dtype), which is exactly
    lowbit's float32 value rounded once to float16; they must be bit-identical to that;
  * logits: KLD against lowbit's own float32 forward < 1e-3, top-1 agreement > 0.99.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowbit.calib.dataset import CalibConfig, build_calibration
from lowbit.calib.text import default_calib_text
from lowbit.eval.compare import Session
from lowbit.eval.data import load_tokenizer
from lowbit.eval.metrics import token_kld
from lowbit.formats.hf_export import export_checkpoint
from lowbit.formats.lowbit_ckpt import LowbitCheckpoint
from lowbit.model.forward import iter_logits
from lowbit.quant.methods import parse_config
from lowbit.quant.pipeline import quantize_checkpoint

pytestmark = pytest.mark.consumers

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / "benchmarks" / ".venvs" / "gptqmodel" / "bin" / "python"
SCRIPT = Path(__file__).resolve().parent / "consumers" / "gptqmodel_load.py"

# (lowbit config, format, dtype the loader runs in). GPTQ runs in float32 where gptqmodel's torch kernel
# allows it; AWQ's CPU kernel takes float16 only.
EXPORTS = [
    ("rtn:4:128", "gptq", "float32"),       # symmetric, 576-wide rows stored as groups of 64
    ("rtn:4:64:asym", "gptq", "float32"),   # asymmetric: zero points of 0 stored mirrored (v1 zero - 1)
    ("gptq:4:64:act", "gptq", "float32"),   # calibrated GPTQ with act-order: desc_act, permuted g_idx
    ("rtn:3:128:asym", "gptq", "float32"),  # 3-bit: codes straddle int32 words
    ("rtn:8:ch", "gptq", "float32"),        # 8-bit per channel
    ("rtn:4:128", "awq", "float16"),        # symmetric, explicit zeros 8
    ("awq:4:64:asym", "awq", "float16"),    # calibrated AWQ, asymmetric
]


def quantize_each(model_dir: Path, configs: list[str], root: Path) -> dict[str, Path]:
    """One real checkpoint per distinct lowbit config; calibrated methods use 8 x 256 tokens of wiki-calib."""
    calib = build_calibration(load_tokenizer(model_dir), default_calib_text(), CalibConfig(8, 256, seed=0))
    ckpts = {}
    for cfg in dict.fromkeys(configs):
        qcfg = parse_config(cfg)
        ckpts[cfg] = root / cfg.replace(":", "_")
        quantize_checkpoint(model_dir, qcfg, ckpts[cfg], calib=calib if qcfg.method != "rtn" else None)
    return ckpts


@pytest.fixture(scope="module")
def loaded(model_dir: Path, session: Session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not PEER_PY.is_file():
        pytest.skip(f"{PEER_PY} missing: run `make consumers` (or benchmarks/peers/setup_peer_venvs.sh gptqmodel)")
    root = tmp_path_factory.mktemp("consumers")
    ckpts = quantize_each(model_dir, [cfg for cfg, _, _ in EXPORTS], root)
    jobs = []
    for cfg, fmt, dtype in EXPORTS:
        folder = export_checkpoint(ckpts[cfg], fmt, root / f"{ckpts[cfg].name}-{fmt}")
        jobs.append({"folder": str(folder), "out": f"{folder}.out.safetensors", "dtype": dtype})
    save_file({"tokens": session.windows.tokens}, str(root / "tokens.safetensors"))
    (root / "jobs.json").write_text(json.dumps({"tokens": str(root / "tokens.safetensors"), "jobs": jobs}))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run([str(PEER_PY), str(SCRIPT), str(root / "jobs.json")], env=env, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {(cfg, fmt): (ckpts[cfg], Path(job["out"])) for (cfg, fmt, _), job in zip(EXPORTS, jobs)}


@pytest.mark.parametrize("cfg,fmt", [(c, f) for c, f, _ in EXPORTS], ids=[f"{c}-{f}" for c, f, _ in EXPORTS])
def test_gptqmodel_loads_export_exactly(loaded, session: Session, cfg: str, fmt: str) -> None:
    ck_path, out = loaded[(cfg, fmt)]
    ck = LowbitCheckpoint(ck_path)
    theirs = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        info = {k: json.loads(v) for k, v in f.metadata().items()}
    assert sorted(n for n in theirs if n != "__logits__") == sorted(ck.quantized_names)
    worst = 0.0
    for name in ck.quantized_names:
        w = theirs[name]
        assert w.dtype == torch.float16
        worst = max(worst, (w.float() - ck.tensor(name).half().float()).abs().max().item())
    ours = torch.stack([lg for _, lg in iter_logits(ck, session.windows.tokens)])
    lg = theirs["__logits__"]
    vocab = ours.shape[-1]
    kld = token_kld(torch.log_softmax(ours.reshape(-1, vocab), -1), lg.reshape(-1, vocab)).mean().item()
    top1 = (ours.argmax(-1) == lg.argmax(-1)).float().mean().item()
    print(f"\n{cfg} as {fmt} in transformers+gptqmodel ({','.join(info['modules'])}, {info['dtype']}): "
          f"max|dW vs ours in fp16| {worst}, KLD {kld:.3g}, top-1 {top1:.4f}")
    assert info.get("loading_info", {}) == {}  # no missing, unexpected or mismatched keys
    assert worst == 0.0
    assert kld < 1e-3 and top1 > 0.99


# ---------------------------------------------------------------- every family of the arch table


@pytest.fixture(scope="module")
def family_loaded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """GPTQ and AWQ (rtn:4:128) of every family's small model (tests/families.py), loaded by gptqmodel."""
    from families import FAMILIES, build_family_model

    from lowbit.eval.data import tokenize_text

    if not PEER_PY.is_file():
        pytest.skip(f"{PEER_PY} missing: run `make consumers` (or benchmarks/peers/setup_peer_venvs.sh gptqmodel)")
    root = tmp_path_factory.mktemp("consumer-families")
    jobs, out = [], {}
    for fam in FAMILIES:
        model = build_family_model(fam, root / fam)
        ck = root / f"{fam}-rtn4"
        quantize_checkpoint(model, parse_config("rtn:4:128"), ck)
        ids = tokenize_text(load_tokenizer(model), Path(default_calib_text()))[:128]
        save_file({"tokens": torch.tensor([ids])}, str(root / f"{fam}-tokens.safetensors"))
        for fmt, dtype in (("gptq", "float32"), ("awq", "float16")):
            folder = export_checkpoint(ck, fmt, root / f"{fam}-{fmt}")
            jobs.append({"folder": str(folder), "out": f"{folder}.out.safetensors", "dtype": dtype,
                         "tokens": str(root / f"{fam}-tokens.safetensors")})
            out[fam, fmt] = (ck, Path(jobs[-1]["out"]), torch.tensor([ids]))
    (root / "jobs.json").write_text(json.dumps({"tokens": jobs[0]["tokens"], "jobs": jobs}))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run([str(PEER_PY), str(SCRIPT), str(root / "jobs.json")], env=env, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
@pytest.mark.parametrize("fam", ["llama3", "llama-spm", "mistral", "qwen2", "qwen3"])
def test_gptqmodel_loads_every_family(family_loaded, fam: str, fmt: str) -> None:
    """No missing or unexpected keys (q/k/v biases, q/k norms), and the logits match lowbit's forward."""
    ck_path, out, tokens = family_loaded[fam, fmt]
    ck = LowbitCheckpoint(ck_path)
    theirs = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        info = {k: json.loads(v) for k, v in f.metadata().items()}
    assert info.get("loading_info", {}) == {}
    ours = dict(iter_logits(ck, tokens))[0]
    kld = token_kld(torch.log_softmax(ours, -1), theirs["__logits__"][0]).mean().item()
    print(f"\n{fam} {fmt} in transformers+gptqmodel: KLD {kld:.3g}")
    assert kld < 1e-3
