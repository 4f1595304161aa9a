"""Quantize with bitsandbytes itself (the reference NF4 / LLM.int8), for the side-by-side benchmark.

Runs in benchmarks/.venvs/bnb. transformers quantizes on load (BitsAndBytesConfig) and saves the folder
before any forward pass (bitsandbytes repacks NF4 on a CPU's first forward). The folder is bitsandbytes' own
format, which lowbit's reader scores directly.

    python bnb_quantize.py --model DIR --out OUT --kind nf4|int8
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=["nf4", "int8"], default="nf4")
    a = p.parse_args()
    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32) if a.kind == "nf4"
         else BitsAndBytesConfig(load_in_8bit=True))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=q, dtype=torch.float32,
                                                 device_map="cpu")
    wall = time.perf_counter() - t0
    out = Path(a.out)
    model.save_pretrained(out / "native")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(a.model) / f).is_file():
            (out / "native" / f).write_bytes((Path(a.model) / f).read_bytes())
    (out / "peer.json").write_text(json.dumps({"tool": "bitsandbytes", "method": a.kind, "quantize_wall_s":
                                               round(wall, 2), "versions": {"bitsandbytes": version("bitsandbytes"),
                                                                           "transformers": version("transformers")}},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
