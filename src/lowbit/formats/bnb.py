"""bitsandbytes checkpoints (NF4 with double quantization, or LLM.int8), as transformers saves and loads them.

Per quantized Linear X (checked against folders bitsandbytes 0.50.2 itself saved):
  NF4:  X.weight uint8 [out*in/2, 1] (two codes a byte, high nibble first), X.weight.absmax uint8 [blocks],
        X.weight.nested_absmax f32, X.weight.nested_quant_map f32 [256], X.weight.quant_map f32 [16], and
        X.weight.quant_state.bitsandbytes__nf4: the bytes of a JSON object (quant_type, blocksize 64, dtype,
        shape, nested_blocksize 256, nested_dtype, nested_offset).
  INT8: X.weight int8 [out, in], X.SCB f32 [out], X.weight_format uint8 0.
Everything else (embedding, norms, biases, an untied head) is stored as the source holds it.
config.json gets `quantization_config` with quant_method "bitsandbytes" and the BitsAndBytesConfig fields.
`AutoModelForCausalLM.from_pretrained(folder)` loads it with bitsandbytes installed, on CPU too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats.hf_export import read_folder_config
from lowbit.formats.safetensors_io import TensorStore
from lowbit.model.arch import arch_for
from lowbit.model.forward import StoredWeights
from lowbit.model.hf import spec_from_config
from lowbit.quant import int8, nf4

KINDS = ("nf4", "int8")
NF4_STATE = "quant_state.bitsandbytes__nf4"


def pack_nf4(qt: nf4.NF4Tensor, dtype_name: str) -> dict[str, torch.Tensor]:
    """The six tensors of one NF4 Linear, suffixes relative to `X.weight`."""
    flat = qt.codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    packed = ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8).unsqueeze(1)
    state = {"quant_type": "nf4", "blocksize": nf4.BLOCK, "dtype": dtype_name, "shape": list(qt.shape),
             "nested_blocksize": nf4.NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": qt.offset}
    return {"": packed, ".absmax": qt.absmax_codes, ".nested_absmax": qt.nested_absmax.float(),
            ".nested_quant_map": qt.qmap.float(), ".quant_map": nf4.NF4_LEVELS.clone(),
            f".{NF4_STATE}": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)}


def unpack_nf4(get) -> nf4.NF4Tensor:
    """Read one NF4 Linear back; `get(suffix)` returns the tensor `X.weight{suffix}`."""
    state = json.loads(bytes(get(f".{NF4_STATE}").tolist()).decode())
    shape = tuple(state["shape"])
    if state.get("quant_type") != "nf4" or int(state.get("blocksize", 0)) != nf4.BLOCK:
        raise LowbitError(f"bitsandbytes 4-bit state {state}: lowbit reads nf4 with blocksize {nf4.BLOCK} only")
    packed = get("").reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1)[: shape[0] * shape[1]].reshape(shape)
    return nf4.NF4Tensor(codes.to(torch.uint8), get(".absmax"), get(".nested_absmax").float(),
                         float(torch.tensor(state["nested_offset"], dtype=torch.float32)),
                         get(".nested_quant_map").float())


def pack_int8(qt: int8.Int8Tensor) -> dict[str, torch.Tensor]:
    """Suffixes relative to the module X (X.weight, X.SCB, X.weight_format)."""
    return {".weight": qt.codes, ".SCB": qt.scb.float(), ".weight_format": torch.tensor(0, dtype=torch.uint8)}


def quantization_config(kind: str, dtype_name: str) -> dict[str, Any]:
    four = kind == "nf4"
    return {"_load_in_4bit": four, "_load_in_8bit": not four, "bnb_4bit_compute_dtype": dtype_name,
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4" if four else "fp4",
            "bnb_4bit_use_double_quant": four, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
            "load_in_4bit": four, "load_in_8bit": not four, "quant_method": "bitsandbytes"}


class BnbWeights(StoredWeights):
    """Reader: any weight of a bitsandbytes folder as float32, dequantized exactly as the loader does."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        self.config = read_folder_config(self.path)
        qc = self.config.get("quantization_config") or {}
        if qc.get("quant_method") != "bitsandbytes":
            raise LowbitError(f"{cfg_path}: not a bitsandbytes checkpoint (quant_method {qc.get('quant_method')!r})")
        self.kind = "nf4" if qc.get("load_in_4bit") else "int8"
        self.spec = spec_from_config(self.config, arch_for(self.config.get("model_type"), str(cfg_path)), cfg_path)
        self.store = TensorStore(self.path)
        names = set(self.store.names())
        marker = f".weight.{NF4_STATE}" if self.kind == "nf4" else ".SCB"
        self.quantized_names = sorted(n.removesuffix(marker) + ".weight" for n in names if n.endswith(marker))

    def quantized(self, name: str) -> nf4.NF4Tensor | int8.Int8Tensor:
        base = name.removesuffix(".weight")
        if self.kind == "nf4":
            return unpack_nf4(lambda sfx: self.store.raw(f"{name}{sfx}"))
        return int8.Int8Tensor(self.store.raw(f"{base}.weight"), self.store.raw(f"{base}.SCB").float())

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.quantized_names:
            return self.quantized(name).dequantize()
        return self.store.get(name)
