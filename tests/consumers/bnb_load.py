"""Run in benchmarks/.venvs/bnb: load a bitsandbytes folder with transformers, as a user does, and dump
each quantized Linear's weight as bitsandbytes dequantizes it, plus the logits on the given tokens.

    python bnb_load.py FOLDER TOKENS.safetensors OUT.safetensors

Weights are dequantized before any forward pass (bitsandbytes repacks NF4 weights on a CPU's first forward).
"""

import sys

import bitsandbytes.functional as F
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

folder, tokens_path, dst = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
out = {}
for name, mod in model.named_modules():
    w = getattr(mod, "weight", None)
    if w is None:
        continue
    cls = type(w).__name__
    if cls == "Params4bit":
        out[f"{name}.weight"] = F.dequantize_4bit(w.data, w.quant_state).float().contiguous()
    elif cls == "Int8Params":
        out[f"{name}.weight"] = F.int8_vectorwise_dequant(w.data, mod.state.SCB if mod.state.SCB is not None
                                                          else w.SCB).float().contiguous()
tokens = load_file(tokens_path)["tokens"]
with torch.inference_mode():
    out["logits"] = model(tokens).logits.float().contiguous()
save_file(out, dst)
print(len(out) - 1, "quantized linears")
