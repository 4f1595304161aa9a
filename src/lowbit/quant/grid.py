"""The uniform integer grid every lowbit method quantizes onto.

One place defines groups, scales, zero points, codes, packing and the exact bit
count, so RTN, GPTQ, AWQ and the exporters agree on the numbers by construction.

Conventions (the ones GPTQ, AWQ and compressed-tensors checkpoints share):
  * codes are unsigned integers in [0, 2**bits - 1];
  * a weight is dequantized as scale * (code - zero);
  * groups run along the input dimension of a [out, in] weight; group_size -1
    means one group per output row ("channel");
  * scales are stored in float16, and codes are computed from the *rounded*
    scale so that what is stored dequantizes to exactly what was evaluated;
  * symmetric grids fix zero = 2**(bits-1) and pick the scale from the
    signed extreme (value of largest magnitude maps to code 0, llama.cpp's
    Q4_0 rule), which uses all 2**bits levels;
  * asymmetric grids stretch [min(w, 0), max(w, 0)] over the levels with an
    integer zero point, so zero stays exactly representable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lowbit.errors import LowbitError

VALID_BITS = range(2, 9)
VALID_GROUPS = (-1, 32, 64, 128, 256)
SCALE_BITS = 16


@dataclass(frozen=True)
class GridConfig:
    """Bits, group size and symmetry of one quantized tensor.

    `float_zero` keeps each group's zero point as a float16 instead of an integer code (HQQ's and
    MLX's affine form, w = s*(q - z)): 12 more bits per group at 4-bit, and a better fit because
    the grid can slide by less than one step. GPTQ, AWQ and compressed-tensors files store integer
    zeros and refuse it; lowbit's checkpoint and MLX hold it exactly.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    float_zero: bool = False

    @classmethod
    def from_meta(cls, t: dict) -> "GridConfig":
        """The grid of one tensor entry of a lowbit checkpoint's JSON (bits, group_size, symmetric[, float_zero])."""
        return cls(int(t["bits"]), int(t["group_size"]), bool(t["symmetric"]), bool(t.get("float_zero", False)))

    def with_group(self, group_size: int) -> "GridConfig":
        return GridConfig(self.bits, group_size, self.symmetric, self.float_zero)

    def __post_init__(self) -> None:
        if self.float_zero and self.symmetric:
            raise LowbitError("a float zero point needs an asymmetric grid; add asym (or drop fzero)")
        if self.bits not in VALID_BITS:
            raise LowbitError(f"--bits {self.bits} is not supported; choose an integer from 2 to 8")
        if self.group_size not in VALID_GROUPS:
            raise LowbitError(
                f"--group-size {self.group_size} is not supported; choose 32, 64, 128, 256 or -1 (per channel)"
            )

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def groups_for(self, in_features: int) -> tuple[int, int]:
        """(number of groups, group length) for a row of `in_features` columns.

        When the group size does not divide the row (SmolLM2's 576 = 4.5 x 128),
        the last group is shorter: column j always belongs to group j // group_size,
        the same rule GPTQ's g_idx encodes.
        """
        if self.group_size == -1:
            return 1, in_features
        return -(-in_features // self.group_size), self.group_size

    def tag(self) -> str:
        g = "ch" if self.group_size == -1 else str(self.group_size)
        return f"w{self.bits}g{g}{'' if self.symmetric else 'a'}{'f' if self.float_zero else ''}"


@dataclass
class QuantizedTensor:
    """Integer codes plus per-group scale and zero: the one currency between methods and formats.

    `g_idx` (act-order checkpoints) maps each input column to its group; when it
    is None, column j belongs to group j // group_size.
    """

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float16 [out, n_groups]
    zeros: torch.Tensor  # uint8 [out, n_groups]; float16 when config.float_zero
    config: GridConfig
    g_idx: torch.Tensor | None = None  # int32 [in]
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def column_groups(self) -> torch.Tensor:
        """Group index of every input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        n_in = self.codes.shape[1]
        glen = n_in if self.config.group_size == -1 else self.config.group_size
        return torch.arange(n_in) // glen

    def dequantize(self) -> torch.Tensor:
        gi = self.column_groups()
        scale = self.scales.float()[:, gi]
        zero = self.zeros.float()[:, gi]
        return scale * (self.codes.float() - zero)

    def storage_bits(self) -> int:
        """Exact bits lowbit stores: codes, fp16 scales, packed (or fp16) zeros (asymmetric only), g_idx if any."""
        out, n_in = self.shape
        n_groups = self.scales.shape[1]
        bits = out * n_in * self.config.bits + out * n_groups * SCALE_BITS
        if not self.config.symmetric:
            bits += out * n_groups * (SCALE_BITS if self.config.float_zero else self.config.bits)
        if self.g_idx is not None:
            bits += n_in * 32
        return bits

    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.codes.numel()


def group_view(weight: torch.Tensor, cfg: GridConfig) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_len], zero-padding a short last group.

    Zero padding never moves a group's range: asymmetric ranges always include
    0, and a zero never wins the symmetric absolute-max.
    """
    out, n_in = weight.shape
    n_groups, glen = cfg.groups_for(n_in)
    pad = n_groups * glen - n_in
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(out, n_groups, glen)


def ungroup(grouped: torch.Tensor, n_in: int) -> torch.Tensor:
    """Inverse of group_view: [out, n_groups, group_len] -> [out, n_in]."""
    return grouped.reshape(grouped.shape[0], -1)[:, :n_in]


def fit_scale_zero(
    w: torch.Tensor, cfg: GridConfig, clip: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for groups laid along the last dim of `w` (any leading shape).

    `clip` (a scalar, or one ratio per group: shape w.shape[:-1]) shrinks the range, which
    is how AWQ's and the MSE clipping searches reuse this function. Returned
    scales are already float16-representable; zeros are integer-valued floats.
    """
    w = w.float()
    if cfg.symmetric:
        idx = w.abs().argmax(dim=-1, keepdim=True)
        extreme = torch.gather(w, -1, idx).squeeze(-1) * clip
        scale = extreme / -cfg.sym_zero
        zero = torch.full_like(scale, float(cfg.sym_zero))
    else:
        wmin = w.amin(dim=-1).clamp(max=0) * clip
        wmax = w.amax(dim=-1).clamp(min=0) * clip
        scale = (wmax - wmin) / cfg.qmax
        scale = fp16_nonzero(scale)
        zero = -wmin / scale
        zero = zero.half().float() if cfg.float_zero else torch.clamp(torch.round(zero), 0, cfg.qmax)
    return fp16_nonzero(scale), zero


def fit_scale_zero_mse(w: torch.Tensor, cfg: GridConfig, importance: torch.Tensor | None = None,
                       ratios: tuple[float, ...] = tuple(1 - i / 40 for i in range(13))
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like fit_scale_zero, but each group keeps the range shrink that minimises its
    importance-weighted squared rounding error (importance: one weight per element of the
    last dim, e.g. diag of the Hessian; None means plain MSE). Ratio 1.0 is min/max.
    """
    imp = torch.ones(w.shape[-1], device=w.device) if importance is None else importance.float()
    best_s, best_z = fit_scale_zero(w, cfg)
    best_err = ((w - decode(encode(w, best_s, best_z, cfg), best_s, best_z)).pow(2) * imp).sum(-1)
    for r in ratios[1:]:
        s, z = fit_scale_zero(w, cfg, r)
        err = ((w - decode(encode(w, s, z, cfg), s, z)).pow(2) * imp).sum(-1)
        better = err < best_err
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_err = torch.where(better, err, best_err)
    return best_s, best_z


def fp16_nonzero(scale: torch.Tensor) -> torch.Tensor:
    """Round to float16 and replace zero scales (all-zero groups) by 1 so division is safe."""
    s = scale.clamp(-65504.0, 65504.0).half().float()
    return torch.where(s == 0, torch.ones_like(s), s)


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: GridConfig) -> torch.Tensor:
    """Codes for `w` (groups on the last dim) given per-group scale/zero of shape w.shape[:-1].

    An integer zero is added after rounding (so a tie rounds as it always has); a float zero before."""
    if cfg.float_zero:
        q = torch.round(w.float() / scale.unsqueeze(-1) + zero.unsqueeze(-1))
    else:
        q = torch.round(w.float() / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp_(0, cfg.qmax)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale.unsqueeze(-1) * (codes.float() - zero.unsqueeze(-1))


def from_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: GridConfig, n_in: int,
                g_idx: torch.Tensor | None = None) -> QuantizedTensor:
    """Assemble a QuantizedTensor from grouped codes [out, ng, g] (or flat [out, in]) and [out, ng] params."""
    out = codes.shape[0]
    return QuantizedTensor(
        codes=ungroup(codes.reshape(out, -1, 1), n_in).to(torch.uint8),
        scales=scale.reshape(out, -1).half(),
        zeros=zero.reshape(out, -1).to(torch.float16 if cfg.float_zero else torch.uint8),
        config=cfg,
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
    )


def quantize_rtn(weight: torch.Tensor, cfg: GridConfig) -> QuantizedTensor:
    """Round-to-nearest on the grid: the baseline every calibrated method must beat."""
    g = group_view(weight.float(), cfg)
    scale, zero = fit_scale_zero(g, cfg)
    return from_groups(encode(g, scale, zero, cfg), scale, zero, cfg, weight.shape[1])


# ---------------------------------------------------------------- packing


def pack_bits(codes: torch.Tensor | np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (last dim) into a little-endian bit stream of uint8, `bits` bits each.

    Works for every width 2..8 (values straddle byte boundaries for 3, 5, 6, 7),
    so the stored size is exactly numel * bits / 8 when a row fills whole bytes.
    Widths that divide a byte (1, 2, 4, 8) are shifted into place directly, the same stream without
    the 8x bit-plane expansion (an 8B model's linears pack 5x faster).
    """
    arr = codes.numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    arr = arr.astype(np.uint8, copy=False)
    lead, n = arr.shape[:-1], arr.shape[-1]
    if (n * bits) % 8:
        raise LowbitError(f"cannot pack a row of {n} values at {bits} bits into whole bytes")
    if 8 % bits == 0:
        per = 8 // bits
        fields = arr.reshape(*lead, n // per, per) & np.uint8((1 << bits) - 1)
        out = fields[..., 0].copy()
        for k in range(1, per):
            out |= fields[..., k] << np.uint8(bits * k)
        return out
    bitplanes = np.unpackbits(arr[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(bitplanes.reshape(*lead, n * bits), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_bits: `n` codes per row."""
    lead = packed.shape[:-1]
    if 8 % bits == 0 and n % (8 // bits) == 0:
        per = 8 // bits
        shifts = (np.arange(per) * bits).astype(np.uint8)
        fields = (np.asarray(packed, dtype=np.uint8)[..., : n // per, None] >> shifts) & np.uint8((1 << bits) - 1)
        return fields.reshape(*lead, n)
    flat = np.unpackbits(packed, axis=-1, bitorder="little")[..., : n * bits]
    planes = flat.reshape(*lead, n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (planes.astype(np.uint16) * weights).sum(-1).astype(np.uint8)
