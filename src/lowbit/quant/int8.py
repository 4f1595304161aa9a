"""LLM.int8 weights (Dettmers et al., 2022), as bitsandbytes stores them: int8 codes and one absmax per row.

code = round(w * (127 / absmax_row)); the loader computes w = code * SCB * (1/127) in float32, with
SCB = absmax_row (float32). The outlier decomposition of LLM.int8 happens on the activations at run time
(llm_int8_threshold), not in the file. `quantize_rtn` is bitsandbytes' own rounding, so its bytes equal
what `BitsAndBytesConfig(load_in_8bit=True)` writes (a consumer test checks); the calibrated variant keeps SCB and lets GPTQ
choose the codes (quant/gptq_codebook.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INV_127 = torch.tensor(7.874015718698502e-3, dtype=torch.float32)  # bitsandbytes' float32 1/127


@dataclass
class Int8Tensor:
    codes: torch.Tensor  # int8 [out, in]
    scb: torch.Tensor  # float32 [out]: each row's absmax

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scb.view(-1, 1) * INV_127


def row_absmax(w: torch.Tensor) -> torch.Tensor:
    return w.float().abs().amax(dim=1)


def quantize_rtn(weight: torch.Tensor) -> Int8Tensor:
    """bitsandbytes' rounding, which starts from a float16 copy of the weight (Int8Params casts to half
    before quantizing), so SCB is the float16 row absmax."""
    w = weight.half().float()
    scb = row_absmax(w)
    safe = torch.where(scb == 0, torch.ones_like(scb), scb)
    codes = torch.round(w * (127.0 / safe.unsqueeze(-1))).to(torch.int8)
    return Int8Tensor(codes, scb)


class Int8Grid:
    """Integer codes -127..127 with one scale (SCB) per row, for the GPTQ column loop."""

    block = 0  # one scale for the whole row

    def encode(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        return torch.round(w * (127.0 / safe)).clamp(-127, 127).to(torch.int8)

    def value(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return codes.float() * scale * INV_127.to(scale.device)
