"""GPTQ checkpoints (`quant_method: gptq`, `checkpoint_format: gptq`, the "v1" layout).

Per quantized linear X (weight [out, in]):
  X.qweight  int32 [in*bits/32, out]   codes packed along the input dim, lowest bits first
                                      (3-bit codes straddle words: one bit stream per column)
  X.qzeros   int32 [n_groups, out*bits/32]  zero points packed along the output dim, stored as
                                      zero - 1 (the v1 convention; loaders add the 1 back)
  X.scales   float16 [n_groups, out]
  X.g_idx    int32 [in]               group of every input column; act-order ("desc_act")
                                      checkpoints have a permuted map, others column // group
and a weight is scales[g_idx[j], o] * (code[j, o] - (qzeros[g_idx[j], o] + 1)).

The v1 "zero - 1" cannot hold a zero point of 0: it would be stored as -1, and the loaders'
add-one then carries into the neighbouring field. lowbit's symmetric grids always have
zero = 2**(bits-1); an asymmetric group whose zero is 0 is stored mirrored (negated scale,
codes qmax - code, zero qmax), which dequantizes to the same numbers bit for bit. The reader
undoes the mirror (lowbit's asymmetric scales are never negative), so round trips are exact.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lowbit.formats.hf_export import HFFormat, flip_zero_groups, n_groups, pack_int32, packed_words, unpack_int32
from lowbit.quant.grid import GridConfig, QuantizedTensor


class GPTQFormat(HFFormat):
    name = "gptq"
    quant_method = "gptq"
    bits = (2, 3, 4, 8)
    act_order = True
    marker = "qweight"

    def quantization_config(self, grid: GridConfig, act_order: bool, meta: dict[str, Any]) -> dict[str, Any]:
        q = meta.get("quant", {})
        return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": grid.bits,
                "group_size": grid.group_size, "desc_act": act_order, "sym": grid.symmetric,
                "static_groups": bool(q.get("static_groups")), "true_sequential": True, "lm_head": False,
                "damp_percent": float(q.get("damp_percent", 0.01)), "pack_dtype": "int32"}

    def runtime_note(self, grid: GridConfig, act_order: bool) -> str | None:
        # vLLM 0.32's GPTQ config takes (4|8 bits, sym) only and refuses desc_act=True.
        if act_order:
            return ("vLLM does not serve GPTQ act-order (desc_act) checkpoints; transformers + gptqmodel load "
                    "this one, and for vLLM re-quantize with --static-groups (act-order without g_idx)")
        if not grid.symmetric or grid.bits not in (4, 8):
            kind = f"{grid.bits}-bit {'symmetric' if grid.symmetric else 'asymmetric'}"
            alt = ("use --format awq or --format compressed-tensors" if grid.bits == 4 else
                   "use --format compressed-tensors" if grid.bits == 8 else "no HF format holds it (4/8-bit only)")
            return (f"vLLM serves GPTQ only as symmetric 4/8-bit, not {kind}; transformers + gptqmodel load this "
                    f"one, and for vLLM {alt}")
        return None

    def grid(self, qc: dict[str, Any]) -> GridConfig:
        return GridConfig(int(qc["bits"]), int(qc.get("group_size", 128)), bool(qc.get("sym", True)))

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        if not qt.config.symmetric:
            qt = flip_zero_groups(qt, qt.zeros == 0)
        bits = qt.config.bits
        return {"qweight": pack_int32(qt.codes, bits).T.contiguous(),
                "qzeros": pack_int32((qt.zeros.T - 1).contiguous(), bits),
                "scales": qt.scales.T.contiguous(),
                "g_idx": qt.column_groups().to(torch.int32)}

    def stored_tensors(self, out: int, n_in: int, grid: GridConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        g = n_groups(n_in, grid)
        return {"qweight": ((packed_words(n_in, grid.bits), out), torch.int32),
                "qzeros": ((g, packed_words(out, grid.bits)), torch.int32),
                "scales": ((g, out), torch.float16), "g_idx": ((n_in,), torch.int32)}

    def unpack(self, get: Callable[[str], torch.Tensor], grid: GridConfig) -> QuantizedTensor:
        qweight, scales, g_idx = get("qweight"), get("scales"), get("g_idx")
        n_in, out = qweight.shape[0] * 32 // grid.bits, qweight.shape[1]
        codes = unpack_int32(qweight.T, grid.bits, n_in)
        zeros = (unpack_int32(get("qzeros"), grid.bits, out) + 1).T.contiguous()
        trivial = torch.equal(g_idx.long(), torch.arange(n_in) // (n_in if grid.group_size == -1 else grid.group_size))
        qt = QuantizedTensor(codes, scales.T.contiguous(), zeros, grid, None if trivial else g_idx)
        return qt if grid.symmetric else flip_zero_groups(qt, qt.scales < 0)


GPTQ = GPTQFormat()
