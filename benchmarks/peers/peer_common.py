"""Shared helpers for the peer-quantizer scripts in this folder.

Imported by llmcompressor_quantize.py and gptqmodel_quantize.py, which each run
in their own venv, so this module uses only the standard library, numpy, torch
and safetensors (present in every peer venv) and nothing from lowbit.

What it provides:
  * the common CLI (--model --method --calib-tokens --out --bits --group-size ...);
  * loading the calibration token matrix (int64 [n_samples, seqlen]);
  * writing OUT/dequantized/: config.json (quantization_config removed), the
    tokenizer files, and model.safetensors with float32 weights under exactly the
    tensor names (and shapes) of the input model;
  * an independent audit of the dequantized weights: for every Linear of the
    decoder it counts the distinct values inside each (row, group) and compares
    with the input model, so "which layers did the tool really quantize" does
    not rest on the tool's own bookkeeping;
  * writing OUT/peer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def parse_args(tool: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"Quantize an HF model with {tool} (peer benchmark).")
    p.add_argument("--model", required=True, help="input HF folder (float weights)")
    p.add_argument("--method", required=True, choices=["gptq", "awq"])
    p.add_argument("--calib-tokens", required=True, help="int64 .npy [n_samples, seqlen] of token ids")
    p.add_argument("--out", required=True, help="output folder (native/, dequantized/, peer.json)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true", help="GPTQ activation ordering (off by default)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening fraction (default 0.01)")
    p.add_argument("--asym", action="store_true",
                   help="asymmetric (zero-point) grid; default is the tool's default, symmetric")
    return p


def load_calib(path: str) -> np.ndarray:
    a = np.load(path)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise SystemExit(f"{path}: expected an integer array [n_samples, seqlen], got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def source_tensors(model_dir: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the input model's safetensors file(s)."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{model_dir}: no .safetensors files")
    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                out[k] = tuple(sf.get_slice(k).get_shape())
    return out


def load_source_state(model_dir: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def write_dequantized(model_dir: str, out_dir: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a plain float32 HF folder holding `state` under the input model's names.

    `state` may hold extra entries (scales, zero points, a tied lm_head); only the
    names present in the input model's safetensors are written, and every one of
    them must be present with the same shape.
    """
    src = source_tensors(model_dir)
    missing = [k for k in src if k not in state]
    if missing:
        raise RuntimeError(f"dequantized state lacks {len(missing)} tensors, e.g. {missing[:5]}")
    bad = [(k, tuple(state[k].shape), s) for k, s in src.items() if tuple(state[k].shape) != s]
    if bad:
        raise RuntimeError(f"shape mismatch vs input model: {bad[:5]}")
    tensors = {k: state[k].detach().to(torch.float32).contiguous().clone() for k in src}
    od = Path(out_dir)
    if od.exists():
        shutil.rmtree(od)
    od.mkdir(parents=True)
    save_file(tensors, str(od / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    (od / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in Path(model_dir).iterdir():
        if f.name == "config.json" or f.name in WEIGHT_INDEX_NAMES or f.suffix in WEIGHT_FILE_SUFFIXES:
            continue
        if f.is_file():
            shutil.copy2(f, od / f.name)
    return tensors


def _max_levels(w: torch.Tensor, group_size: int) -> int:
    """Largest number of distinct values in any (row, group); groups run along the
    input dimension, column j in group j // group_size (a short last group when the
    width is not a multiple)."""
    n_in = w.shape[1]
    g = n_in if group_size <= 0 else group_size
    worst = 0
    for a in range(0, n_in, g):
        s = w[:, a:a + g].sort(dim=1).values
        n = (s[:, 1:] != s[:, :-1]).sum(dim=1) + 1
        worst = max(worst, int(n.max()))
    return worst


def audit_layers(model_dir: str, deq: dict[str, torch.Tensor], bits: int,
                 group_of: dict[str, int]) -> dict:
    """Classify every 2-D `.weight` of the decoder layers (the Linear weights).

    group_of: linear module name -> group size the tool was asked to use for it
    (layers absent from it are checked at the nominal size of the first entry).
    A layer counts as quantized when every (row, group) holds at most 2**bits
    distinct values; as unchanged when it equals the input bit for bit.
    """
    src = load_source_state(model_dir)
    default_g = next(iter(group_of.values())) if group_of else 128
    rows = {}
    for k, w0 in src.items():
        if not (k.startswith("model.layers.") and k.endswith(".weight") and w0.ndim == 2):
            continue
        name = k[: -len(".weight")]
        w = deq[k].float()
        g = group_of.get(name, default_g)
        levels = _max_levels(w, g)
        if torch.equal(w, w0.float()):
            status = "unchanged"
        elif levels <= 2 ** bits:
            status = "quantized"
        else:
            status = "modified_not_on_grid"
        rows[name] = {"status": status, "max_levels_per_group": levels, "group_size_checked": g,
                      "in_features": int(w.shape[1])}
    summary: dict[str, list[str]] = {}
    for n, r in rows.items():
        summary.setdefault(r["status"], []).append(n)
    return {"counts": {s: len(v) for s, v in summary.items()},
            "not_quantized": sorted(n for n, r in rows.items() if r["status"] != "quantized"),
            "per_layer": rows}


def compress_names(names: list[str]) -> list[str]:
    """['model.layers.0.self_attn.q_proj', ...] -> ['model.layers.{0-29}.self_attn.q_proj', ...]."""
    import re
    by: dict[str, list[int]] = {}
    other = []
    for n in names:
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", n)
        if m:
            by.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            other.append(n)
    out = []
    for suf, idx in sorted(by.items()):
        idx = sorted(idx)
        rng = f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ",".join(map(str, idx))
        out.append(f"model.layers.{{{rng}}}.{suf}" if len(idx) > 1 else f"model.layers.{idx[0]}.{suf}")
    return out + sorted(other)


def write_peer_json(out_dir: str, payload: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "peer.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")


def finish_run(out_dir: str, payload: dict, audit: dict, summary_keys: tuple[str, ...]) -> None:
    """Write peer.json and audit_per_layer.json, then print a short summary for the log."""
    write_peer_json(out_dir, payload)
    (Path(out_dir) / "audit_per_layer.json").write_text(json.dumps(audit["per_layer"], indent=1) + "\n")
    print(json.dumps({k: payload[k] for k in ("tool", "method", "quantize_wall_s", *summary_keys)}, indent=1))
    print("audit:", audit["counts"])


def linear_in_features(model: torch.nn.Module) -> dict[str, int]:
    """Decoder Linear module name -> in_features (lm_head excluded)."""
    return {n: m.in_features for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


def fallback_group(in_features: int, group_size: int) -> int:
    """Largest power-of-two group below group_size that divides in_features."""
    g = group_size // 2
    while g >= 8:
        if in_features % g == 0:
            return g
        g //= 2
    return -1


def env_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
