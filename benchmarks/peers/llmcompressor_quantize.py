"""Quantize an HF model with llm-compressor (GPTQ or AWQ, W4A16) for the peer benchmark.

Run inside benchmarks/.venvs/llmcompressor (see setup_peer_venvs.sh):

    python llmcompressor_quantize.py --model HF_DIR --method gptq|awq \
        --calib-tokens CALIB.npy --out OUT_DIR [--bits 4 --group-size 128] \
        [--act-order] [--asym] [--indivisible fallback|ignore]

Calibration: the rows of CALIB.npy are fed unchanged, one sample per batch, through
a torch DataLoader handed straight to `oneshot` (no tokenization, shuffling or
truncation by llm-compressor).

Scheme: compressed-tensors' W4A16 preset (int, symmetric, group strategy);
--asym switches to W4A16_ASYM's asymmetric args. GPTQ: dampening_frac=--damp
(0.01), actorder None (--act-order: "group", i.e. desc_act with g_idx), other
GPTQModifier settings default. AWQ: AWQModifier() with its defaults followed by a
QuantizationModifier with the same scheme (the non-deprecated recipe form).

Group-size divisibility: llm-compressor refuses group quantization of a Linear
whose in_features is not a multiple of the group size (validate_group_size_divisibility
at initialize, and compressed-tensors' forward raises even with
bypass_divisibility_checks). For SmolLM2 (hidden 576 = 4.5 x 128) that is every
q/k/v/o/gate/up projection. --indivisible picks what to do with them:
  fallback (default): quantize them with the largest power-of-two group that
      divides in_features (64 for 576), through a second config group;
  ignore: leave them in float (only down_proj, 1536 wide, gets quantized).
Both are recorded in peer.json (group_size_per_layer / unquantized_layers).

On a CPU-only host, AWQ dies in IntermediatesCache.pin_memory ("Cannot access
accelerator device"); the method is replaced by a no-op at runtime when no
accelerator is present (site-packages are not edited).

Outputs: OUT/native (compressed-tensors checkpoint written by the model's
save_pretrained as patched by llm-compressor), OUT/dequantized (float32 HF
folder obtained by reloading OUT/native with transformers + compressed-tensors,
run_compressed=False, which decompresses the packed int4 weights), OUT/peer.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402


def main() -> int:
    ap = pc.parse_args("llm-compressor")
    ap.add_argument("--indivisible", choices=["fallback", "ignore"], default="fallback")
    args = ap.parse_args()
    calib = pc.load_calib(args.calib_tokens)

    import torch
    import transformers
    import compressed_tensors
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pin_patched = False
    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *a, **k: None  # CPU: nothing to pin
        pin_patched = True

    out = Path(args.out)
    native = out / "native"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    model.eval()

    # --- per-layer group sizes ------------------------------------------------
    in_feats = pc.linear_in_features(model)
    g = args.group_size
    group_of: dict[str, int] = {}
    ignored: list[str] = []
    for name, nin in in_feats.items():
        if g <= 0 or nin % g == 0 or nin < g:
            group_of[name] = g
        elif args.indivisible == "ignore":
            ignored.append(name)
        else:
            fg = pc.fallback_group(nin, g)
            if fg <= 0:
                ignored.append(name)
            else:
                group_of[name] = fg

    def wargs(gs: int) -> QuantizationArgs:
        return QuantizationArgs(num_bits=args.bits, type="int", symmetric=not args.asym,
                                strategy="group" if gs > 0 else "channel",
                                group_size=gs if gs > 0 else None, dynamic=False)

    config_groups = {}
    for i, gs in enumerate(sorted(set(group_of.values()), reverse=True)):
        targets = sorted(n for n, v in group_of.items() if v == gs)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=wargs(gs))
    ignore = ["lm_head"] + ignored

    if args.method == "gptq":
        recipe = [GPTQModifier(config_groups=config_groups, ignore=ignore,
                               dampening_frac=args.damp,
                               actorder="group" if args.act_order else None)]
    else:
        recipe = [AWQModifier(), QuantizationModifier(config_groups=config_groups, ignore=ignore)]

    samples = [{"input_ids": torch.from_numpy(r).unsqueeze(0),
                "attention_mask": torch.ones(1, r.shape[0], dtype=torch.long)} for r in calib]
    loader = torch.utils.data.DataLoader(samples, batch_size=None, shuffle=False)

    t0 = time.perf_counter()
    model = oneshot(model=model, tokenizer=tok, recipe=recipe, dataset=loader,
                    num_calibration_samples=len(samples), max_seq_length=int(calib.shape[1]),
                    shuffle_calibration_samples=False)
    quant_s = time.perf_counter() - t0

    model.save_pretrained(str(native), save_compressed=True)
    tok.save_pretrained(str(native))

    # --- reload with the tool's loader and read out dequantized weights --------
    from transformers.utils.quantization_config import CompressedTensorsConfig
    reloaded = AutoModelForCausalLM.from_pretrained(
        str(native), dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(run_compressed=False))
    state = {k: v for k, v in reloaded.state_dict().items()}
    deq = pc.write_dequantized(args.model, str(out / "dequantized"), state)
    audit = pc.audit_layers(args.model, deq, args.bits, group_of)

    import json
    qcfg = json.loads((native / "config.json").read_text()).get("quantization_config", {})
    payload = {
        "tool": "llm-compressor",
        "versions": {"llmcompressor": llmcompressor.__version__,
                     "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "method": args.method,
        "settings": {
            "bits": args.bits, "group_size": args.group_size,
            "symmetric": not args.asym,
            "scheme": "W4A16_ASYM-like (asymmetric)" if args.asym else "W4A16 preset args (symmetric)",
            "gptq": ({"dampening_frac": args.damp, "actorder": "group" if args.act_order else None,
                      "block_size": recipe[0].block_size} if args.method == "gptq" else None),
            "awq": ({"duo_scaling": recipe[0].duo_scaling, "n_grid": recipe[0].n_grid,
                     "mappings": "default (architecture registry)"} if args.method == "awq" else None),
            "indivisible_policy": args.indivisible,
            "calibration": {"n_samples": int(calib.shape[0]), "seqlen": int(calib.shape[1]),
                            "batch_size": 1, "source": os.path.abspath(args.calib_tokens)},
            "pin_memory_patched_noop": pin_patched,
            "threads": torch.get_num_threads(),
        },
        "quantize_wall_s": round(quant_s, 3),
        "quantize_wall_s_covers": "llmcompressor.oneshot(...) only (calibration + quantization)",
        "group_size_per_layer": {str(k): pc.compress_names(sorted(n for n, v in group_of.items() if v == k))
                                 for k in sorted(set(group_of.values()), reverse=True)},
        "unquantized_layers": ignored,
        "unquantized_layers_compact": pc.compress_names(ignored),
        "not_targeted": ["model.embed_tokens", "lm_head (tied to model.embed_tokens)"],
        "padding": None,
        "native_quantization_config": qcfg,
        "audit": {"counts": audit["counts"], "not_quantized": audit["not_quantized"]},
        "dequantized_from": "transformers AutoModelForCausalLM + CompressedTensorsConfig(run_compressed=False) on native/",
    }
    pc.finish_run(str(out), payload, audit, ("unquantized_layers_compact", "group_size_per_layer"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
