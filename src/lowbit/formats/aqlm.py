"""AQLM checkpoints, as transformers loads them with the aqlm package (`quant_method: "aqlm"`).

Per quantized Linear X (aqlm 1.1.7's QuantizedLinear, out_group_size 1):
  X.codes      int8 (8-bit codebooks) or int16 (16-bit) [out, in/in_group, num_codebooks]; a code k is stored
               as k - 2^nbits when k >= 2^(nbits-1) (aqlm's pack_int_data), read back modulo 2^nbits;
  X.codebooks  float16 [num_codebooks, 2^nbits, 1, in_group];
  X.scales     float16 [out, 1, 1, 1];
  X.bias       when the source has one (Qwen2's q/k/v), as the source stores it.
The weight is scales[r] * sum_c codebooks[c, codes[r, j, c]] on columns in_group*j ... in_group*(j+1).
config.json gets `quantization_config` {quant_method, in_group_size, out_group_size, num_codebooks,
nbits_per_codebook, linear_weights_not_to_quantize}. The skip list names modules ("lm_head"), not weights:
transformers 5.24 no longer matches "lm_head.weight", and an unlisted head becomes an empty AQLM layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats.hf_export import read_folder_config
from lowbit.formats.safetensors_io import TensorStore
from lowbit.model.arch import arch_for
from lowbit.model.forward import StoredWeights
from lowbit.model.hf import spec_from_config
from lowbit.quant.aqlm import AQLMConfig, AQLMTensor

MARKER = ".codebooks"  # one per quantized Linear


def code_dtype(nbits: int) -> torch.dtype:
    return torch.int8 if nbits <= 8 else torch.int16


def pack(qt: AQLMTensor, nbits: int) -> dict[str, torch.Tensor]:
    """The three tensors of one Linear, suffixes relative to the module name X."""
    codes = qt.codes.clone()
    codes[codes >= 1 << (nbits - 1)] -= 1 << nbits
    return {".codes": codes.to(code_dtype(nbits)).contiguous(),
            MARKER: qt.codebooks.to(torch.float16).unsqueeze(2).contiguous(),
            ".scales": qt.scales.to(torch.float16).reshape(-1, 1, 1, 1).contiguous()}


def unpack(get, nbits: int) -> AQLMTensor:
    """One Linear back; `get(suffix)` returns the tensor `X{suffix}`."""
    books = get(MARKER)
    if books.ndim != 4 or books.shape[2] != 1:
        raise LowbitError(f"AQLM codebooks of shape {tuple(books.shape)}: lowbit reads out_group_size 1 only")
    codes = get(".codes").to(torch.int64) % (1 << nbits)
    return AQLMTensor(codes, books.squeeze(2).to(torch.float16), get(".scales").reshape(-1).to(torch.float16))


def quantization_config(cfg: AQLMConfig, skip_modules: list[str]) -> dict[str, Any]:
    return {"quant_method": "aqlm", "in_group_size": cfg.in_group, "out_group_size": 1,
            "num_codebooks": cfg.num_codebooks, "nbits_per_codebook": cfg.nbits,
            "linear_weights_not_to_quantize": skip_modules}


class AQLMWeights(StoredWeights):
    """Reader: any weight of an AQLM folder as float32 (codebooks and scales as the file stores them)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        self.config = read_folder_config(self.path)
        qc = self.config.get("quantization_config") or {}
        if qc.get("quant_method") != "aqlm":
            raise LowbitError(f"{cfg_path}: not an AQLM checkpoint (quant_method {qc.get('quant_method')!r})")
        if int(qc.get("out_group_size", 1)) != 1:
            raise LowbitError(f"{cfg_path}: out_group_size {qc.get('out_group_size')}; lowbit reads 1 only")
        self.nbits = int(qc.get("nbits_per_codebook", 0))
        if self.nbits not in (8, 16):
            raise LowbitError(f"{cfg_path}: nbits_per_codebook {self.nbits!r}; lowbit reads 8 and 16")
        self.kind = f"{qc.get('num_codebooks')}x{self.nbits}"
        self.spec = spec_from_config(self.config, arch_for(self.config.get("model_type"), str(cfg_path)), cfg_path)
        self.store = TensorStore(self.path)
        self.quantized_names = sorted(n.removesuffix(MARKER) + ".weight" for n in self.store.names()
                                      if n.endswith(MARKER))

    def quantized(self, name: str) -> AQLMTensor:
        base = name.removesuffix(".weight")
        return unpack(lambda sfx: self.store.raw(f"{base}{sfx}"), self.nbits)

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.quantized_names:
            return self.quantized(name).dequantize()
        return self.store.get(name)
