"""The shared grid: exact round trips, error bounds, packing and bit accounting."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.grid import GridConfig, pack_bits, quantize_rtn, unpack_bits

BITS = range(2, 9)
GROUPS = (32, 64, 128, 256, -1)


def weight(rows: int = 16, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02 + torch.randn(rows, 1, generator=g) * 0.005


@pytest.mark.parametrize("bits,group,sym", list(itertools.product(BITS, GROUPS, (True, False))))
def test_grid_round_trip(bits: int, group: int, sym: bool) -> None:
    cfg = GridConfig(bits, group, sym)
    w = weight()
    qt = quantize_rtn(w, cfg)
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) <= cfg.qmax
    deq = qt.dequantize()
    # Error bound: half a step inside the range; at most one step where the range edge is clipped
    # (symmetric grids lose one level on the positive side, asymmetric ones round the zero point).
    step = qt.scales.float().abs()[:, qt.column_groups()]
    err = (w - deq).abs() / step
    assert float(err.max()) <= 1.0 + 1e-5
    assert float((err <= 0.5 + 1e-5).float().mean()) > 0.95
    # Codes survive decode -> encode with the stored scale and zero exactly.
    gi = qt.column_groups()
    scale, zero = qt.scales.float()[:, gi], qt.zeros.float()[:, gi]
    assert torch.equal(torch.round(deq / scale + zero).to(torch.uint8), qt.codes)
    if sym:  # a symmetric grid is a fixed point: re-quantizing the dequantized weight changes nothing
        assert torch.equal(quantize_rtn(deq, cfg).dequantize(), deq)
    # Bit packing is lossless.
    packed = pack_bits(qt.codes, bits)
    assert packed.shape[-1] == w.shape[1] * bits // 8
    assert np.array_equal(unpack_bits(packed, bits, w.shape[1]), qt.codes.numpy())


def test_ragged_last_group_matches_column_rule() -> None:
    """576 columns at group 128: 5 groups, the last one 64 wide, column j in group j // 128."""
    cfg = GridConfig(4, 128, False)
    w = weight(8, 576)
    qt = quantize_rtn(w, cfg)
    assert qt.scales.shape == (8, 5)
    last = quantize_rtn(w[:, 512:], GridConfig(4, 64, False))
    assert torch.equal(qt.scales[:, 4], last.scales[:, 0])
    assert torch.equal(qt.codes[:, 512:], last.codes)


def test_more_bits_less_error() -> None:
    w = weight()
    errors = [float((quantize_rtn(w, GridConfig(b, 128)).dequantize() - w).pow(2).mean()) for b in BITS]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_bits_per_weight_by_hand() -> None:
    """[8, 256] at 4 bits, group 128: 8*256*4 code bits + 8*2 fp16 scales = 8448 bits / 2048 weights."""
    w = weight(8, 256)
    sym = quantize_rtn(w, GridConfig(4, 128, True))
    assert sym.storage_bits() == 8 * 256 * 4 + 8 * 2 * 16 == 8448
    assert sym.bits_per_weight() == 4.125
    asym = quantize_rtn(w, GridConfig(4, 128, False))  # plus 8*2 zero points of 4 bits
    assert asym.storage_bits() == 8448 + 8 * 2 * 4
    assert asym.bits_per_weight() == 4.15625
    chan = quantize_rtn(w, GridConfig(3, -1, True))  # 3 bits + one fp16 scale per 256-wide row
    assert chan.bits_per_weight() == 3 + 16 / 256


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bad_bits_rejected(bits: int) -> None:
    with pytest.raises(LowbitError, match="--bits"):
        GridConfig(bits, 128)


def test_bad_group_rejected() -> None:
    with pytest.raises(LowbitError, match="--group-size"):
        GridConfig(4, 100)
