"""Run in benchmarks/.venvs/aqlm: load an AQLM folder with transformers + aqlm, as a user does, and dump
each quantized Linear's weight as aqlm dequantizes it, plus the logits on the given tokens.

    NUMBA_NUM_THREADS=1 python aqlm_load.py FOLDER TOKENS.safetensors OUT.safetensors

Weights are read before any forward pass (aqlm permutes 2x8 codes in place on a CPU's first forward). Its
numba kernel for 256-entry codebooks races between threads, hence one numba thread.
"""

import sys
import warnings

import torch
from aqlm import QuantizedLinear
from aqlm.utils import _dequantize_weight, unpack_int_data
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging

folder, tokens_path, dst = sys.argv[1:4]
logging.set_verbosity_warning()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
out = {}
for name, mod in model.named_modules():
    if isinstance(mod, QuantizedLinear):
        nbits = mod.codebooks.shape[1].bit_length() - 1
        w = _dequantize_weight(unpack_int_data(mod.codes.data, nbits), mod.codebooks.data, mod.scales.data)
        out[f"{name}.weight"] = w.float().contiguous()
tokens = load_file(tokens_path)["tokens"]
with torch.inference_mode():
    out["logits"] = model(tokens).logits.float().contiguous()
save_file(out, dst)
print(len(out) - 1, "quantized linears")
for w in caught:
    print("WARNING", w.message)
