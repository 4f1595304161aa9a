"""Quantize an HF model with GPTQModel (GPTQ or AWQ, 4-bit) for the peer benchmark.

Run inside benchmarks/.venvs/gptqmodel (see setup_peer_venvs.sh):

    GPTQMODEL_CPU_WORKERS=2 python gptqmodel_quantize.py --model HF_DIR --method gptq|awq \
        --calib-tokens CALIB.npy --out OUT_DIR [--bits 4 --group-size 128] [--act-order] [--asym]

Calibration: each row of CALIB.npy becomes one {"input_ids", "attention_mask"} dict
of python ints, passed to GPTQModel's `quantize(calibration=..., batch_size=1)`;
rows are all the same length so its length-sorting and min-length filter change
nothing (the count it used is checked against the input).

Settings: QuantizeConfig(bits, group_size, sym=True unless --asym). GPTQ:
damp_percent=--damp (0.01), desc_act=--act-order (False by default) and
act_group_aware=False (GPTQModel turns its "GAR" reordering on for GPTQ by
default; it is turned off so that "act-order off" means no reordering at all),
everything else default. AWQ: method=AWQ, format=GEMM, defaults otherwise;
on CPU the kernel is BACKEND.AWQ_TORCH (GPTQ uses BACKEND.GPTQ_TORCH), both for
the quantize call and for the reload.

Outputs: OUT/native (GPTQModel.save), OUT/dequantized (float32 HF folder), OUT/peer.json.
Dequantized weights come from reloading OUT/native with GPTQModel.load (float16:
its CPU torch kernels accept only fp16/bf16) and pushing a float16 identity matrix
through every quantized Linear's own forward (y = I W^T, no bias in Llama), so
they are exactly the float16 values the tool's CPU kernel multiplies by;
for one layer of each shape this is cross-checked against the module's
dequantize_weight() when it has one (the max difference goes into peer.json).
Norms and embeddings are taken from the reloaded model (AWQ folds its scales
into the preceding norms / projections).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402


def main() -> int:
    args = pc.parse_args("GPTQModel").parse_args()
    calib = pc.load_calib(args.calib_tokens)
    # GPTQModel writes a logs/ folder into the current directory: run from OUT_DIR.
    args.model, args.out, args.calib_tokens = (os.path.abspath(p) for p in
                                               (args.model, args.out, args.calib_tokens))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.chdir(args.out)

    import torch
    import transformers
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    out = Path(args.out)
    native = out / "native"
    if args.method == "gptq":
        qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym,
                              desc_act=bool(args.act_order), act_group_aware=False,
                              damp_percent=args.damp)
        backend = BACKEND.GPTQ_TORCH
    else:
        qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym,
                              method="awq", format="gemm")
        backend = BACKEND.AWQ_TORCH

    # AWQ's CPU packing (AwqTorchLinear) accepts only float16/bfloat16 modules.
    load_as = torch.float16 if args.method == "awq" else torch.float32
    model = GPTQModel.load(args.model, qcfg, dtype=load_as, device="cpu")
    load_dtype = str(next(model.model.parameters()).dtype)
    in_feats = pc.linear_in_features(model.model)

    calibration = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calib]
    t0 = time.perf_counter()
    model.quantize(calibration, batch_size=1, backend=backend)
    quant_s = time.perf_counter() - t0
    model.save(str(native))
    used_cfg = json.loads((native / "config.json").read_text()).get("quantization_config", {})
    del model

    # --- reload with the tool's loader; read weights out through its kernels ----
    # Its CPU torch kernels only run in float16/bfloat16: reload in float16 (the
    # dtype of the saved scales). Tensors the tool kept in float (embedding, norms,
    # AWQ-rescaled norms included) are read straight from native/*.safetensors so
    # they are not rounded to float16.
    qm = GPTQModel.load(str(native), backend=backend, device="cpu", dtype=torch.float16)
    hf = qm.model
    state = pc.load_source_state(str(native))
    quantized, shapes, cross = [], {}, {}
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if not isinstance(mod, BaseQuantLinear):
                continue
            quantized.append(name)
            n_in = mod.in_features
            eye = torch.eye(n_in, dtype=torch.float16)
            w = mod(eye).float().t().contiguous()  # [out, in]
            state[f"{name}.weight"] = w
            suffix = name.split(".")[-1]
            if suffix not in shapes:
                shapes[suffix] = {k: list(getattr(mod, k).shape) for k in ("qweight", "qzeros", "scales", "g_idx")
                                  if isinstance(getattr(mod, k, None), torch.Tensor)}
                shapes[suffix].update(in_features=n_in, out_features=mod.out_features,
                                      kernel=type(mod).__name__)
                if hasattr(mod, "dequantize_weight"):
                    try:
                        dw = mod.dequantize_weight().float()
                        # dequantize_weight() returns [in, out]
                        if tuple(dw.shape) == (n_in, mod.out_features):
                            dw = dw.t()
                        cross[name] = float((dw[: w.shape[0], : w.shape[1]] - w).abs().max())
                    except Exception as e:  # report, do not fail the run
                        cross[name] = f"dequantize_weight failed: {e!r}"
    deq = pc.write_dequantized(args.model, str(out / "dequantized"), state)

    not_quant = sorted(n for n in in_feats if n not in set(quantized))
    group_of = {n: args.group_size for n in in_feats}
    audit = pc.audit_layers(args.model, deq, args.bits, group_of)
    padded = {s: v for s, v in shapes.items()
              if "scales" in v and args.group_size > 0
              and v["in_features"] % args.group_size != 0}

    payload = {
        "tool": "gptqmodel",
        "versions": {"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "method": args.method,
        "settings": {
            "bits": args.bits, "group_size": args.group_size, "symmetric": not args.asym,
            "quantize_config": used_cfg,
            "backend": str(backend), "model_load_dtype": load_dtype, "reload_dtype": "float16",
            "calibration": {"n_samples": int(calib.shape[0]), "seqlen": int(calib.shape[1]),
                            "batch_size": 1, "source": os.path.abspath(args.calib_tokens)},
            "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS"),
            "threads": torch.get_num_threads(),
        },
        "quantize_wall_s": round(quant_s, 3),
        "quantize_wall_s_covers": "GPTQModel BaseQModel.quantize(...) only",
        "group_size_per_layer": {str(args.group_size): pc.compress_names(quantized)},
        "unquantized_layers": not_quant,
        "unquantized_layers_compact": pc.compress_names(not_quant),
        "not_targeted": ["model.embed_tokens", "lm_head (tied to model.embed_tokens)"],
        "indivisible_handling": {
            "layers": pc.compress_names(sorted(n for n, k in in_feats.items()
                                               if args.group_size > 0 and k % args.group_size)),
            "packed_shapes_of_indivisible": padded,
            "note": "groups run j // group_size; a width of 576 at g128 gives ceil(576/128)=5 groups "
                    "per row, the last one 64 columns wide (see scales shape)",
        },
        "packed_shapes": shapes,
        "identity_vs_dequantize_weight_maxabs": cross,
        "audit": {"counts": audit["counts"], "not_quantized": audit["not_quantized"]},
        "dequantized_from": "GPTQModel.load(native) then each quantized Linear's forward on an identity matrix",
    }
    pc.finish_run(str(out), payload, audit, ("unquantized_layers_compact", "identity_vs_dequantize_weight_maxabs"))
    print("packed shapes:", json.dumps(shapes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
