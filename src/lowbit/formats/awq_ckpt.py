"""AWQ checkpoints in the GEMM layout (`quant_method: awq`, `version: gemm`).

Per quantized linear X (weight [out, in]), everything is laid out transposed, [in, out]:
  X.qweight  int32 [in, out/8]        eight 4-bit codes of consecutive output columns per word,
                                      interleaved: nibble k holds column 8*w + ORDER[k]
  X.qzeros   int32 [n_groups, out/8]  zero points, packed the same way (stored as they are)
  X.scales   float16 [n_groups, out]
and a weight is scales[j // group, o] * (code[j, o] - zero[j // group, o]).

AWQ has no g_idx (groups are always contiguous) and its GEMM kernels take 4-bit codes only.
lowbit's symmetric grids are stored with their explicit zero 8, so `zero_point` is always true.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lowbit.formats.hf_export import HFFormat, n_groups, pack_int32, packed_words, unpack_int32
from lowbit.quant.grid import GridConfig, QuantizedTensor

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the GEMM kernels' interleave: nibble k <- column ORDER[k]
REVERSE = tuple(ORDER.index(c) for c in range(8))


def _pack_cols(values: torch.Tensor) -> torch.Tensor:
    """[rows, out] 4-bit values -> int32 [rows, out/8] in AWQ's interleaved order."""
    rows, out = values.shape
    return pack_int32(values.reshape(rows, out // 8, 8)[:, :, list(ORDER)].reshape(rows, out), 4)


def _unpack_cols(words: torch.Tensor, out: int) -> torch.Tensor:
    rows = words.shape[0]
    return unpack_int32(words, 4, out).reshape(rows, out // 8, 8)[:, :, list(REVERSE)].reshape(rows, out)


class AWQFormat(HFFormat):
    name = "awq"
    quant_method = "awq"
    bits = (4,)
    group_sizes = (32, 64, 128)
    marker = "qweight"

    def quantization_config(self, grid: GridConfig, act_order: bool, meta: dict[str, Any]) -> dict[str, Any]:
        return {"quant_method": "awq", "version": "gemm", "bits": grid.bits, "group_size": grid.group_size,
                "zero_point": True, "modules_to_not_convert": None}

    def grid(self, qc: dict[str, Any]) -> GridConfig:
        # lowbit writes zero_point true for both grids; HFExport takes the symmetry from
        # lowbit_export.json when the folder has one.
        return GridConfig(int(qc.get("bits", 4)), int(qc.get("group_size", 128)), not qc.get("zero_point", True))

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        return {"qweight": _pack_cols(qt.codes.T.contiguous()),
                "qzeros": _pack_cols(qt.zeros.T.contiguous()),
                "scales": qt.scales.T.contiguous()}

    def stored_tensors(self, out: int, n_in: int, grid: GridConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        g = n_groups(n_in, grid)
        return {"qweight": ((n_in, packed_words(out, 4)), torch.int32),
                "qzeros": ((g, packed_words(out, 4)), torch.int32), "scales": ((g, out), torch.float16)}

    def unpack(self, get: Callable[[str], torch.Tensor], grid: GridConfig) -> QuantizedTensor:
        scales = get("scales")
        out = scales.shape[1]
        codes = _unpack_cols(get("qweight"), out).T.contiguous()
        zeros = _unpack_cols(get("qzeros"), out).T.contiguous()
        return QuantizedTensor(codes, scales.T.contiguous(), zeros, grid)


AWQ = AWQFormat()
