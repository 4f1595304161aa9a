"""NF4 with double quantization: bitsandbytes' 4-bit grid (QLoRA, Dettmers et al., 2023), as its files hold it.

A weight is cut into blocks of 64 consecutive values (row-major). Each block keeps its absolute maximum;
a value is stored as the index of the nearest of 16 fixed levels (the NF4 "normal float" levels, in
[-1, 1]) of value / absmax. Double quantization then stores the absmaxes themselves in 8 bits: minus
their mean (the "offset"), in blocks of 256, each block scaled by its own float32 absmax onto bitsandbytes'
signed dynamic 8-bit map. What a loader computes, in float32:

    absmax[b] = dynamic_map[absmax_code[b]] * nested_absmax[b // 256] + offset
    w         = NF4_LEVELS[code] * absmax[block of w]

`quantize_rtn` is bitsandbytes' own quantizer (codes chosen against the raw absmax, before it is double-
quantized; nearest level by midpoints, ties to the lower level), so its bytes equal what
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)` writes (a consumer test checks).
`fit_scales` + a codebook solver (quant/gptq_codebook.py) is lowbit's calibrated variant: the same file,
with codes chosen by GPTQ against the absmax the loader will really use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 64
NESTED_BLOCK = 256

# The 16 NF4 levels: QLoRA (arXiv:2305.14314) appendix E, as float32 in bitsandbytes' get_4bit_type("nf4").
# Stored as data: the loader dequantizes with these exact values, whatever the file's quant_map says.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_BOUNDS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (Dettmers, arXiv:1511.04561), built from its definition.

    For each decimal exponent e = -6 .. 0, 2^e' evenly spaced fraction midpoints in (0.1, 1] times 10^e,
    mirrored for the sign, plus 0 and 1; sorted. The loader reads this table from the file, so lowbit
    writes the one it quantized with.
    """
    non_sign = total_bits - 1
    values: list[float] = []
    for i in range(max_exponent_bits):
        n = 2 ** (i + non_sign - max_exponent_bits) + 1
        edges = torch.linspace(0.1, 1, n, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        magnitude = 10 ** (-(max_exponent_bits - 1) + i)
        values += (magnitude * mids).tolist() + (-magnitude * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass
class NF4Tensor:
    """One weight on the NF4 grid, in the pieces a bitsandbytes file stores."""

    codes: torch.Tensor  # uint8 [out, in], 0..15
    absmax_codes: torch.Tensor  # uint8 [n_blocks]
    nested_absmax: torch.Tensor  # float32 [ceil(n_blocks / 256)]
    offset: float  # a float32 value
    qmap: torch.Tensor  # float32 [256], the dynamic map the absmax codes index

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def absmax(self) -> torch.Tensor:
        """The per-block absmax as the loader reconstructs it (float32)."""
        return decode_absmax(self.absmax_codes, self.nested_absmax, self.offset, self.qmap)

    def dequantize(self) -> torch.Tensor:
        flat = NF4_LEVELS[self.codes.reshape(-1).long()]
        n = flat.numel()
        per_value = self.absmax().repeat_interleave(BLOCK)[:n]
        return (flat * per_value).reshape(self.shape)


def block_absmax(w: torch.Tensor) -> torch.Tensor:
    """max |w| of each block of 64 consecutive values of the row-major weight (a short last block allowed)."""
    flat = w.float().reshape(-1)
    n = flat.numel()
    full = n - n % BLOCK
    out = flat[:full].reshape(-1, BLOCK).abs().amax(-1)
    if n % BLOCK:
        out = torch.cat([out, flat[full:].abs().amax().reshape(1)])
    return out


def double_quantize(absmax: torch.Tensor, qmap: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """(absmax codes, nested absmax, offset, map): the absmaxes minus their mean, blockwise onto the map."""
    qmap = dynamic_map() if qmap is None else qmap
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    pad = -n % NESTED_BLOCK
    blocks = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, NESTED_BLOCK)
    nested = blocks.abs().amax(-1)
    # the last block's padding is zeros, which never win the max
    scaled = torch.clamp(blocks * (1 / nested).unsqueeze(-1), -1, 1).reshape(-1)[:n]
    codes = nearest(scaled, qmap)
    return codes.to(torch.uint8), nested, float(offset), qmap


def nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table value (first one on a tie), in chunks to bound memory."""
    out = torch.empty(x.numel(), dtype=torch.long)
    flat = x.reshape(-1)
    for a in range(0, flat.numel(), 1 << 16):
        out[a:a + (1 << 16)] = (flat[a:a + (1 << 16)].unsqueeze(-1) - table).abs().argmin(-1)
    return out.reshape(x.shape)


def decode_absmax(codes: torch.Tensor, nested: torch.Tensor, offset: float, qmap: torch.Tensor) -> torch.Tensor:
    per = nested.repeat_interleave(NESTED_BLOCK)[:codes.numel()]
    return qmap[codes.long()] * per + torch.tensor(offset, dtype=torch.float32)


def nf4_codes(w: torch.Tensor, absmax_per_value: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' rounding: clamp(w * (1 / absmax), -1, 1), then the level whose midpoint interval holds it."""
    scaled = torch.clamp(w * (1.0 / absmax_per_value.clamp(min=1e-38)), -1, 1)
    return torch.bucketize(scaled, NF4_BOUNDS, out_int32=True).to(torch.uint8)


def quantize_rtn(weight: torch.Tensor) -> NF4Tensor:
    """bitsandbytes' NF4 + double quantization, reproduced: codes against the raw absmax."""
    w = weight.float()
    absmax = block_absmax(w)
    per_value = absmax.repeat_interleave(BLOCK)[:w.numel()].reshape(w.shape)
    codes = nf4_codes(w, per_value)
    acodes, nested, offset, qmap = double_quantize(absmax)
    return NF4Tensor(codes, acodes, nested, offset, qmap)


def fit_scales(weight: torch.Tensor) -> NF4Tensor:
    """The block scales of a calibrated NF4 tensor, double-quantized up front (codes still to be chosen)."""
    absmax = block_absmax(weight)
    acodes, nested, offset, qmap = double_quantize(absmax)
    return NF4Tensor(torch.zeros(weight.shape, dtype=torch.uint8), acodes, nested, offset, qmap)


class NF4Grid:
    """The NF4 codebook with one scale per (row, 64 columns), for the GPTQ column loop."""

    block = BLOCK

    def encode(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return nf4_codes(w, scale)

    def value(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return NF4_LEVELS.to(scale.device)[codes.long()] * scale
