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
from lowbit.formats.hf_export import (HFFormat, n_groups, pack_int32, packed_words, read_folder_config,
                                      unpack_int32)
from lowbit.formats.safetensors_io import TensorStore
from lowbit.model.arch import LINEARS, arch_for
from lowbit.model.forward import ACT_QUANT, StoredWeights
from lowbit.model.hf import spec_from_config
from lowbit.quant.fp8 import E4M3, FP8Tensor, fake_quantize_per_token
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


# ---------------------------------------------------------------- FP8 (float-quantized / naive-quantized)
#
# FP8 e4m3 weights with one scale per output row (quant/fp8.py), as llm-compressor writes its FP8 schemes:
#   X.weight        float8_e4m3fn [out, in]
#   X.weight_scale  float32 or bfloat16 [out, 1]
# Weight-only (W8A16-FP8) carries `weights` args only; W8A8-FP8 adds `input_activations`: fp8, per token,
# dynamic (FP8_DYNAMIC's activations: scales computed at run time, so no input_scale tensor). The library
# names the format itself (infer_module_format): float-quantized with activations, naive-quantized without;
# both decompress through the same compressor (x_q.to(scale.dtype) * scale, in float32 for a float32 load).

FP8_ACTIVATIONS = ("none", "dynamic")
FP8_MARKER = ".weight_scale"


def fp8_library_config(activations: str):
    """The compressed-tensors QuantizationConfig of lowbit's FP8 export (FP8_DYNAMIC without / with activations)."""
    import torch.nn as nn
    from compressed_tensors.compressors.format import infer_module_format

    if activations not in FP8_ACTIVATIONS:
        raise LowbitError(f"--fp8-activations {activations!r}: choose none (weight-only) or dynamic (W8A8-FP8, "
                          "per-token scales at run time)")
    _, _, Args, Config, Scheme, Status = _library()
    weights = Args(num_bits=8, type="float", symmetric=True, strategy="channel", dynamic=False)
    acts = Args(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True) \
        if activations == "dynamic" else None
    scheme = Scheme(targets=["Linear"], weights=weights, input_activations=acts)
    fmt = infer_module_format(nn.Linear, scheme).value
    scheme = Scheme(targets=["Linear"], weights=weights, input_activations=acts, format=fmt)
    return Config(config_groups={"group_0": scheme}, format=fmt, quantization_status=Status.COMPRESSED,
                  ignore=["lm_head"])


def fp8_quantization_config(activations: str) -> dict[str, Any]:
    """config.json's quantization_config, exactly as ModelCompressor.update_config writes it."""
    import tempfile

    compressor = _library()[0]
    with tempfile.TemporaryDirectory() as tmp:
        compressor(quantization_config=fp8_library_config(activations)).update_config(tmp)
        return json.loads((Path(tmp) / "config.json").read_text())["quantization_config"]


def fp8_scheme(qc: dict[str, Any]) -> tuple[str, str] | None:
    """(weights' scale strategy, activations) of an FP8 compressed-tensors config, None if it is not one."""
    if qc.get("quant_method") != "compressed-tensors":
        return None
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or not isinstance(groups[0], dict):
        return None
    w = groups[0].get("weights") or {}
    if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
        return None
    a = groups[0].get("input_activations")
    return str(w.get("strategy")), "none" if not a else ("dynamic" if a.get("dynamic") else "static")


def pack_fp8(qt: FP8Tensor) -> dict[str, torch.Tensor]:
    """Suffixes relative to the module X."""
    return {".weight": qt.codes.contiguous(), FP8_MARKER: qt.scale.contiguous()}


class FP8Weights(StoredWeights):
    """Reader: any weight of an FP8 compressed-tensors folder as float32, dequantized as the library does.

    A W8A8 (dynamic per-token) folder's forward also rounds each quantized linear's input to fp8, as vLLM and
    transformers do when they run it (emulate_activations=False scores its weights alone)."""

    def __init__(self, path: str | Path, emulate_activations: bool = True):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        self.config = read_folder_config(self.path)
        scheme = fp8_scheme(self.config.get("quantization_config") or {})
        if scheme is None:
            raise LowbitError(f"{cfg_path}: not an FP8 compressed-tensors checkpoint")
        strategy, acts = scheme
        if strategy not in ("channel", "tensor"):
            raise LowbitError(f"{cfg_path}: FP8 weights with {strategy!r} scales; lowbit reads channel and tensor "
                              "scales")
        if acts == "static":
            raise LowbitError(f"{cfg_path}: FP8 with static activation scales (input_scale); lowbit reads "
                              "weight-only and dynamic per-token W8A8 folders")
        self.kind = "w8a16" if acts == "none" else "w8a8-dynamic"
        self.act_quant = acts == "dynamic" and emulate_activations
        self.spec = spec_from_config(self.config, arch_for(self.config.get("model_type"), str(cfg_path)), cfg_path)
        self.store = TensorStore(self.path)
        self.quantized_names = sorted(n.removesuffix(FP8_MARKER) + ".weight" for n in self.store.names()
                                      if n.endswith(FP8_MARKER))

    def quantized(self, name: str) -> FP8Tensor:
        base = name.removesuffix(".weight")
        codes = self.store.raw(name)
        if codes.dtype != E4M3:
            raise LowbitError(f"{self.path}: {name} is {codes.dtype}, not float8_e4m3fn")
        scale = self.store.raw(f"{base}{FP8_MARKER}")
        return FP8Tensor(codes, scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1))

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.quantized_names:
            return self.quantized(name).dequantize()
        return self.store.get(name)

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """A W8A8 folder's linears also round their inputs (per token, dynamic), as its runtimes do."""
        w = super().layer(i)
        if self.act_quant:
            w[ACT_QUANT] = {short: fake_quantize_per_token for short, _ in LINEARS}
        return w
