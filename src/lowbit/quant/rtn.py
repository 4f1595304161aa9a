"""Round-to-nearest: no calibration, the baseline every other method is measured against."""

from __future__ import annotations

import torch

from lowbit.quant.grid import GridConfig, QuantizedTensor, quantize_rtn


def quantize_layer(weight: torch.Tensor, stats: object | None, config: GridConfig,
                   name: str = "weight") -> QuantizedTensor:
    """RTN ignores calibration statistics by design."""
    del stats
    del name
    return quantize_rtn(weight, config)
