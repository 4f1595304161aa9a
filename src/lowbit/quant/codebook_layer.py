"""One decoder layer onto grids whose scales are fixed before any rounding (bitsandbytes NF4/INT8, FP8).

Their pipelines differ only in how one linear is quantized and packed; the layer walk is the same: GPTQ's
Hessian per input group (factored once, shared by the group's linears), each member quantized on the CPU,
its dequantization kept for the next layer's calibration inputs, and the layer's other tensors carried.
"""

from __future__ import annotations

from typing import Callable

import torch

from lowbit.model.arch import LINEARS
from lowbit.model.hf import ModelSpec
from lowbit.quant.gptq import GPTQConfig
from lowbit.quant.gptq_codebook import factor
from lowbit.quant.pipeline import gather_stats
from lowbit.quant.stats import INPUT_GROUPS, LayerStats
from lowbit.runtime import Placement

# (float32 CPU weight, factored Hessian or None, HF name) -> a quantized tensor with dequantize()
QuantizeMember = Callable[[torch.Tensor, object, str], object]
# (linear short name, its quantized tensor) -> the tensors to persist for it
PackMember = Callable[[str, object], dict[str, torch.Tensor]]


def quantize_layer_groups(w: dict[str, torch.Tensor], x: torch.Tensor | None, gptq: GPTQConfig | None,
                          spec: ModelSpec, rope, names: dict[str, str], where: Placement,
                          quantize_member: QuantizeMember, pack_member: PackMember
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(dequantized linears for the next layer's inputs, tensors to persist). `gptq` None: no calibration."""
    stats = None
    if gptq is not None:
        assert x is not None
        # float32 products, accumulated in float64, as the GGUF pipeline's GPTQ (README: Scale)
        stats = gather_stats(x, w, spec, rope, LayerStats(True, False, where.stats_dtype, sums=False,
                                                          product_dtype=torch.float32), where)
    deq, saved = {}, {k: v for k, v in w.items() if k not in dict(LINEARS)}
    for lead, members in INPUT_GROUPS.items():
        fh = None
        if stats is not None:
            fh = factor(stats.for_linear(lead).hessian.cpu(), w[lead].shape[1], names[lead], gptq)
        for m in members:
            qt = quantize_member(w[m].float().cpu(), fh, names[m])
            if x is not None:  # only the next layer's calibration inputs read it
                deq[m] = qt.dequantize().to(w[m].device)
            saved.update(pack_member(m, qt))
    return deq, saved
