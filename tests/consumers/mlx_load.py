"""Run in benchmarks/.venvs/mlx: load an MLX folder with mlx_lm as a user does, and dump each quantized
module's weight as mx.dequantize computes it (float32), plus the logits on the given tokens.

    python mlx_load.py load FOLDER TOKENS.safetensors OUT.safetensors
    python mlx_load.py convert HF_FOLDER OUT_FOLDER BITS GROUP     # mlx_lm.convert(quantize=True)

Loading is strict (mlx_lm raises on a missing or unexpected tensor). A short greedy generation proves the
folder also generates.
"""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten


def load(folder, tokens_path, dst):
    from mlx_lm import generate, load

    model, tokenizer = load(folder)
    out = {}
    for name, mod in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(mod, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(mod.weight, mod.scales, mod.biases, group_size=mod.group_size, bits=mod.bits)
            out[f"{name}.weight"] = w.astype(mx.float32)
    tokens = mx.array(np.load(tokens_path)["tokens"])
    out["logits"] = model(tokens).astype(mx.float32)
    mx.eval(out)
    mx.save_safetensors(dst, out)
    text = generate(model, tokenizer, prompt="The capital of France is", max_tokens=8)
    print(len(out) - 1, "quantized modules; dtype", next(iter(out.values())).dtype, "; generated:", repr(text))


def convert(src, dst, bits, group):
    from mlx_lm import convert

    convert(src, mlx_path=dst, quantize=True, q_bits=int(bits), q_group_size=int(group))


if __name__ == "__main__":
    {"load": load, "convert": convert}[sys.argv[1]](*sys.argv[2:])
