"""FP8 e4m3 weights with one scale per output row, as compressed-tensors' FP8 schemes store them.

The grid: e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits, no infinities; largest finite 448,
smallest subnormal 2**-9). Each row gets scale = absmax(row) / 448 in the stored scale dtype (float32 or
bfloat16), and code = e4m3(w / scale) rounded to nearest, ties to even, which is what torch's
`.to(torch.float8_e4m3fn)` does; the quotient is computed in float32 from the *stored* scale and clamped to
+-448 first (a bfloat16 scale rounded down would otherwise push the row's largest weight past 448).
A row of zeros gets scale 1 and zero codes.

The dequantized weight is code * scale in float32: compressed-tensors' decompressor computes
`x_q.to(scale.dtype) * scale` with the scale in the dtype of the parameter it was loaded into, float32 when
transformers loads the folder in float32 (a bfloat16 scale is widened exactly first), and vLLM keeps its
scales in float32; so lowbit's reader and transformers' float32 load agree bit for bit for either scale dtype.

W8A8-FP8 folders also declare dynamic per-token fp8 activations; `fake_quantize_per_token` is that rounding,
applied by lowbit's reader to every quantized linear's input (transformers' CPU forward of such a folder
equals it exactly: tests/test_fp8.py).

`FP8Grid` is the same grid for GPTQ's column loop (quant/gptq_codebook.py): fixed row scales, codes chosen
with error feedback. Its codes are the e4m3 bytes viewed as uint8 (the loop stores and permutes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class FP8Tensor:
    codes: torch.Tensor  # float8_e4m3fn [out, in]
    scale: torch.Tensor  # [out, 1], float32 or bfloat16

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale.float()


def row_scales(weight: torch.Tensor, dtype: torch.dtype = torch.float32, name: str = "weight") -> torch.Tensor:
    """absmax(row) / 448 in `dtype`, [out, 1]; 1 for an all-zero row."""
    absmax = weight.float().abs().amax(dim=1, keepdim=True)
    if not bool(torch.isfinite(absmax).all()):
        raise LowbitError(f"{name}: holds inf or NaN weights, which FP8 cannot scale; fix the source checkpoint")
    scale = (absmax / E4M3_MAX).to(dtype)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def encode(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of weight / scale (float32 quotient, clamped to +-448, rounded to nearest even)."""
    return (weight.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_rtn(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32, name: str = "weight") -> FP8Tensor:
    scale = row_scales(weight, scale_dtype, name)
    return FP8Tensor(encode(weight, scale), scale)


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """A linear's input as W8A8-FP8 runtimes see it (dynamic per-token scales, FP8_DYNAMIC's activations):
    each token's vector scaled by absmax/448, rounded to e4m3 and scaled back, in x's dtype."""
    s = x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (x / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).to(x.dtype) * s


class FP8Grid:
    """e4m3 codes (as uint8 bytes) with one fixed scale per row, for the GPTQ column loop."""

    block = 0  # one scale for the whole row

    def encode(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return encode(w, scale).view(torch.uint8)

    def value(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return codes.view(E4M3).float() * scale.float()
