"""Load a lowbit GPTQ or AWQ export the way users do (transformers + optimum + gptqmodel, CPU) and dump
what the loader made of it: every quantized linear's dequantized weight and the logits on given tokens.

Runs inside the gptqmodel peer venv (benchmarks/peers/setup_peer_venvs.sh gptqmodel), not lowbit's:

    GPTQMODEL_CPU_WORKERS=2 python gptqmodel_load.py JOBS.json

JOBS.json: {"tokens": TOKENS.safetensors, "jobs": [{"folder": ..., "out": OUT.safetensors, "dtype": ...}]};
one process serves every job, so transformers and gptqmodel are imported once. The weights come from
the loaded modules' own dequantization (TorchQuantLinear.dequantize_weight for GPTQ, gptqmodel's
dequantize_gemm over the module buffers for AWQ), transposed to [out, in]; logits are the model's
forward in the job's dtype (AWQ needs float16: gptqmodel's CPU AWQ kernel takes no other).
TORCHDYNAMO_DISABLE=1 skips gptqmodel's torch.compile of its CPU kernel (minutes, no effect on values).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def load_one(folder: str, tokens, out_path: str, dtype_name: str) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

    qc = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    t0 = time.perf_counter()
    if qc["quant_method"] == "awq":  # the CPU kernels: gptqmodel's AWQ_TORCH / GPTQ torch backends
        override = AwqConfig(bits=qc["bits"], group_size=qc["group_size"], zero_point=qc["zero_point"],
                             version=qc["version"], backend="torch_awq")
    else:
        override = GPTQConfig(bits=qc["bits"], group_size=qc["group_size"], desc_act=qc["desc_act"], sym=qc["sym"],
                              backend="torch")
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype_name), device_map="cpu",
                                                       quantization_config=override, output_loading_info=True)
    model.eval()
    load_s = time.perf_counter() - t0
    out: dict[str, torch.Tensor] = {}
    kinds = set()
    for name, mod in model.named_modules():
        if not hasattr(mod, "qweight"):
            continue
        kinds.add(type(mod).__name__)
        if hasattr(mod, "dequantize_weight"):
            w = mod.dequantize_weight()
        else:
            from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
            w = dequantize_gemm(mod.qweight, mod.qzeros, mod.scales, mod.bits, mod.group_size)
        out[f"{name}.weight"] = w.T.contiguous()
    with torch.inference_mode():
        out["__logits__"] = torch.stack([model(row[None]).logits[0].float() for row in tokens])
    summary = {"modules": sorted(kinds), "quantized": len(out) - 1, "load_seconds": round(load_s, 1),
               "dtype": dtype_name, "loading_info": {k: sorted(map(str, v)) for k, v in info.items() if v}}
    save_file(out, out_path, metadata={k: json.dumps(v) for k, v in summary.items()})
    return summary


def main() -> int:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    spec = json.load(open(sys.argv[1]))
    tokens = load_file(spec["tokens"])["tokens"]
    for job in spec["jobs"]:  # a job may bring its own tokens (each family has its own tokenizer)
        job_tokens = load_file(job["tokens"])["tokens"] if "tokens" in job else tokens
        print(job["folder"], json.dumps(load_one(job["folder"], job_tokens, job["out"], job.get("dtype", "float16"))),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
