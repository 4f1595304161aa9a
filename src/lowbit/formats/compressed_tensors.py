"""compressed-tensors checkpoints in the `pack-quantized` format (W4A16 / W8A16, as llm-compressor writes).

Per quantized linear X (weight [out, in]):
  X.weight_packed      int32 [out, in*bits/32]  signed values q + 2**(bits-1), i.e. lowbit's codes,
                                               packed along the input dim, lowest bits first
  X.weight_scale       float16 [out, n_groups]
  X.weight_zero_point  int32 [out*bits/32, n_groups]  asymmetric only: signed zero z - 2**(bits-1)
                                               plus the same offset (lowbit's zero), packed along
                                               the *output* dim
  X.weight_shape       int64 [2]
and a weight is scale * (q - zp) with signed q, zp: the same numbers as lowbit's
scale * (code - zero), since both sides subtract the same offset. Symmetric schemes have no
zero point (zp = 0), which is lowbit's symmetric zero 2**(bits-1).

The quantization_config metadata is produced by the compressed-tensors library itself
(QuantizationArgs / QuantizationScheme / QuantizationConfig, written by ModelCompressor), so
it is exactly what llm-compressor would write for the same scheme. The library's current
release no longer accepts act-order g_idx ("group" actorder), so act-order goes to GPTQ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from lowbit.errors import LowbitError
from lowbit.formats.hf_export import HFFormat, n_groups, pack_int32, packed_words, unpack_int32
from lowbit.quant.grid import GridConfig, QuantizedTensor


def _library():
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                     QuantizationStatus)
    except ImportError:
        raise LowbitError("the compressed-tensors format needs the compressed-tensors package; "
                          "run `pip install 'lowbit[hf]'` (make setup installs it)") from None
    return ModelCompressor, CompressionFormat, QuantizationArgs, QuantizationConfig, QuantizationScheme, \
        QuantizationStatus


class CompressedTensorsFormat(HFFormat):
    name = "compressed-tensors"
    quant_method = "compressed-tensors"
    bits = (4, 8)
    group_sizes = (-1, 32, 64, 128)
    marker = "weight_packed"

    def library_config(self, grid: GridConfig):
        """The compressed-tensors QuantizationConfig of a lowbit grid (W{bits}A16, pack-quantized)."""
        _, fmt, Args, Config, Scheme, Status = _library()
        channel = grid.group_size == -1
        args = Args(num_bits=grid.bits, type="int", symmetric=grid.symmetric,
                    strategy="channel" if channel else "group", group_size=None if channel else grid.group_size,
                    dynamic=False)
        scheme = Scheme(targets=["Linear"], weights=args)
        return Config(config_groups={"group_0": scheme}, format=fmt.pack_quantized.value,
                      quantization_status=Status.COMPRESSED, ignore=["lm_head"])

    def write_config(self, folder: Path, config: dict[str, Any], grid: GridConfig, act_order: bool,
                     meta: dict[str, Any]) -> None:
        """config.json as ModelCompressor.update_config writes it for llm-compressor's models."""
        compressor = _library()[0]
        base = {k: v for k, v in config.items() if k != "quantization_config"}
        (folder / "config.json").write_text(json.dumps(base, indent=2, sort_keys=True))
        compressor(quantization_config=self.library_config(grid)).update_config(str(folder))

    def grid(self, qc: dict[str, Any]) -> GridConfig:
        groups = qc.get("config_groups") or {}
        if qc.get("format") != "pack-quantized" or len(groups) != 1:
            raise LowbitError("compressed-tensors: lowbit reads single-scheme pack-quantized checkpoints only")
        w = next(iter(groups.values()))["weights"]
        channel = w.get("strategy") == "channel"
        return GridConfig(int(w["num_bits"]), -1 if channel else int(w["group_size"]), bool(w.get("symmetric", True)))

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        bits = qt.config.bits
        out = {"weight_packed": pack_int32(qt.codes, bits),
               "weight_scale": qt.scales.contiguous(),
               "weight_shape": torch.tensor(qt.shape, dtype=torch.int64)}
        if not qt.config.symmetric:
            out["weight_zero_point"] = pack_int32(qt.zeros.T.contiguous(), bits).T.contiguous()
        return out

    def stored_tensors(self, out: int, n_in: int, grid: GridConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        g = n_groups(n_in, grid)
        shapes = {"weight_packed": ((out, packed_words(n_in, grid.bits)), torch.int32),
                  "weight_scale": ((out, g), torch.float16), "weight_shape": ((2,), torch.int64)}
        if not grid.symmetric:
            shapes["weight_zero_point"] = ((packed_words(out, grid.bits), g), torch.int32)
        return shapes

    def unpack(self, get: Callable[[str], torch.Tensor], grid: GridConfig) -> QuantizedTensor:
        out, n_in = (int(v) for v in get("weight_shape"))
        scales = get("weight_scale").half()
        codes = unpack_int32(get("weight_packed"), grid.bits, n_in)
        if grid.symmetric:
            zeros = torch.full(scales.shape, grid.sym_zero, dtype=torch.uint8)
        else:
            zeros = unpack_int32(get("weight_zero_point").T.contiguous(), grid.bits, out).T.contiguous()
        return QuantizedTensor(codes, scales, zeros, grid)


COMPRESSED_TENSORS = CompressedTensorsFormat()
