"""transformers' own logits for an exported HF folder, for `lowbit eval --runtime transformers`.

lowbit's default reads an export's codes itself (exact, fast, any format). This
path asks the real consumer instead: AutoModelForCausalLM.from_pretrained on the
folder, on the CPU in float32, so a layout transformers would read differently
shows up as KLD. transformers loads compressed-tensors exports on the CPU;
GPTQ and AWQ folders need gptqmodel / a GPU kernel, so they are refused here
with the command that works (`make consumers` checks those loaders).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import torch

from lowbit.errors import LowbitError

CPU_FORMATS = ("compressed-tensors",)


def transformers_logits_fn(path: Path, fmt: str):
    if fmt not in CPU_FORMATS:
        raise LowbitError(f"{path}: transformers loads {fmt} exports only through gptqmodel / GPU kernels; score it "
                          "with lowbit's exact reader (drop --runtime) or load it with `make consumers`")

    def run(tokens: torch.Tensor, advance: Callable[..., None]) -> Iterator[tuple[int, torch.Tensor]]:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        # safetensors only (never a pickled .bin) and never the folder's own modelling code
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=False).eval()
        with torch.inference_mode():
            for n in range(tokens.shape[0]):
                yield n, model(tokens[n:n + 1]).logits[0].float()
                advance()

    return run


def export_format(path: Path) -> str:
    qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config", {})
    return "compressed-tensors" if qc.get("quant_method") == "compressed-tensors" else str(qc.get("quant_method"))
