"""Quantize every decoder Linear with the auto-round package (the reference SignRound), for the side-by-side
benchmark.

Runs in benchmarks/.venvs/autoround (setup_peer_venvs.sh autoround). auto-round is fed exactly the calibration
token matrix lowbit uses (an int64 .npy [samples, seqlen], one [1, seqlen] tensor per sample, so auto-round
neither re-tokenizes nor re-draws), with nsamples and seqlen set to that matrix's shape. After
`AutoRound.quantize()` every decoder Linear holds auto-round's own fake-quantized weight (its `qdq` result,
which its GPTQ/AutoRound exporters pack) and its float16 `scale`; this script checks that each weight lies on
that grid (w / scale an integer in [-2^(b-1), 2^(b-1) - 1] for every group), then hands the weights back in
a plain float32 HF folder (OUT/dequantized/), scored by lowbit's forward like every other peer. Everything
that is not a decoder Linear (embedding, norms, the tied lm_head) is the source model's float32 tensor.

    python autoround_quantize.py --model DIR --calib-tokens CALIB.npy --out OUT --bits 4 --group-size 128 \
        --iters 50 [--amp] [--torch-compile auto|on|off]

Settings are auto-round's defaults for `AutoRound(model, tokenizer, bits, group_size, sym=True, iters,
nsamples, seqlen, batch_size=8, seed, device_map="cpu")` (SignRound, lr = minmax_lr = 1/iters decaying
linearly, min-max tuning on, best iterate kept, quantized inputs propagated), except:
  * amp: auto-round's CPU default casts the model to bfloat16 and tunes in it; this script runs float32 (the
    model's dtype, as lowbit does) unless --amp is given;
  * torch.compile: left at auto-round's default (--torch-compile auto: on for iters >= 10 on Linux).
The quantize wall time in peer.json is auto-round's `quantize()` call alone (model load and the writing of
the folder excluded); the harness measures the whole process too.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import (  # noqa: E402
    audit_layers,
    compress_names,
    env_threads,
    finish_run,
    load_calib,
    load_source_state,
    write_dequantized,
)


def grid_check(w: torch.Tensor, scale: torch.Tensor, bits: int, group: int) -> dict:
    """How far `w` is from scale * integer codes in auto-round's symmetric full range, per (row, group)."""
    out, n_in = w.shape
    n_groups = math.ceil(n_in / group)
    if scale.shape != (out, n_groups):
        raise RuntimeError(f"scale shape {tuple(scale.shape)}, expected {(out, n_groups)}")
    s = scale.float().repeat_interleave(group, dim=1)[:, :n_in]
    q = torch.round(w / s)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return {"max_abs_off_grid": float((w - s * q).abs().max()),
            "codes_in_range": bool(((q >= lo) & (q <= hi)).all()),
            "scale_bits": out * n_groups * 16, "code_bits": out * n_in * bits, "weights": out * n_in}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib-tokens", required=True, help="int64 .npy [samples, seqlen], lowbit's calibration")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="auto-round's CPU default: tune in bfloat16")
    p.add_argument("--torch-compile", choices=["auto", "on", "off"], default="auto")
    a = p.parse_args()

    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = load_calib(a.calib_tokens)
    dataset = [torch.from_numpy(row).unsqueeze(0) for row in calib]
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    compile_arg = {"auto": None, "on": True, "off": False}[a.torch_compile]
    t0 = time.perf_counter()
    ar = AutoRound(model, tok, bits=a.bits, group_size=a.group_size, sym=True, iters=a.iters,
                   nsamples=len(dataset), seqlen=int(calib.shape[1]), batch_size=a.batch_size, seed=a.seed,
                   device_map="cpu", dataset=dataset, amp=a.amp, enable_torch_compile=compile_arg)
    qmodel, _ = ar.quantize()
    wall = time.perf_counter() - t0

    state = load_source_state(a.model)
    linears = [k for k, v in state.items()
               if k.startswith("model.layers.") and k.endswith("proj.weight") and v.ndim == 2]
    modules = dict(qmodel.named_modules())
    checks, off_grid, bad_range, missing = {}, 0.0, [], []
    for k in linears:
        name = k[: -len(".weight")]
        m = modules[name]
        scale = getattr(m, "scale", None)
        if scale is None or getattr(m, "bits", 16) != a.bits:
            missing.append(name)
            continue
        w = m.weight.detach().float()
        checks[name] = grid_check(w, scale, a.bits, a.group_size)
        off_grid = max(off_grid, checks[name]["max_abs_off_grid"])
        if not checks[name]["codes_in_range"]:
            bad_range.append(name)
        state[k] = w
    if missing:
        raise SystemExit(f"auto-round left {len(missing)} decoder linears unquantized: {compress_names(missing)}")
    bpw = sum(c["code_bits"] + c["scale_bits"] for c in checks.values()) / sum(c["weights"] for c in checks.values())
    deq = write_dequantized(a.model, f"{a.out}/dequantized", state)
    audit = audit_layers(a.model, deq, a.bits, {k[: -len(".weight")]: a.group_size for k in linears})
    q = getattr(ar, "quantize_config", None)  # the SignRoundConfig, lr resolved
    sr = {f: getattr(q, f, None) for f in ("lr", "minmax_lr", "enable_minmax_tuning", "enable_quanted_input",
                                           "not_use_best_mse", "gradient_accumulate_steps", "momentum")}
    mc = getattr(ar, "model_context", None)
    payload = {
        "tool": "auto-round", "method": f"auto-round W{a.bits}G{a.group_size} sym i{a.iters}",
        "quantize_wall_s": round(wall, 2), "bpw": bpw,
        "versions": {"auto-round": version("auto-round"), "torch": torch.__version__,
                     "transformers": version("transformers")},
        "settings": {"bits": a.bits, "group_size": a.group_size, "sym": True, "iters": a.iters,
                     "nsamples": int(calib.shape[0]), "seqlen": int(calib.shape[1]), "batch_size": a.batch_size,
                     "seed": a.seed, "device_map": "cpu", "dataset": f"{Path(a.calib_tokens).name} (lowbit's tokens)",
                     "amp": bool(getattr(mc, "amp", a.amp)), "amp_dtype": str(getattr(mc, "amp_dtype", None)),
                     "enable_torch_compile": bool(getattr(ar, "enable_torch_compile", False)),
                     "torch_compile_arg": a.torch_compile, "threads": env_threads(),
                     **{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in sr.items()}},
        "grid": {"max_abs_off_grid": off_grid, "codes_out_of_range": bad_range,
                 "checked_layers": len(checks)},
        "unquantized_layers": audit["not_quantized"],
    }
    finish_run(a.out, payload, audit, ("bpw", "settings", "grid"))


if __name__ == "__main__":
    main()
