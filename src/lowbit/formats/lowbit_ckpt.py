"""lowbit's own checkpoint: packed codes + fp16 scales + packed zeros, and a JSON of the run.

Layout of a checkpoint folder:
  lowbit.json                 format version, quant config, per-tensor grid, run stats
  model.safetensors (shards)  for each quantized linear X.weight:
                                X.qweight  uint8 bit stream of codes, row-major [out, in*bits/8]
                                X.scales   float16 [out, n_groups]
                                X.qzeros   uint8 bit stream of zero points (asymmetric grids only)
                                X.g_idx    int32 [in] (act-order only)
                              every other tensor unchanged
  config.json, tokenizer files copied from the source model

The format is exact: reading it back reproduces every code, scale and zero, so
evaluation of a checkpoint measures precisely what was written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.formats.coverage import check_nothing_dropped
from lowbit.formats.safetensors_io import ShardedWriter, TensorStore
from lowbit.model.arch import arch_for, check_remote_code
from lowbit.model.forward import StoredWeights
from lowbit.model.hf import ModelFolder, expected_tensor_names, spec_from_config
from lowbit.quant.grid import GridConfig, QuantizedTensor, pack_bits, unpack_bits

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 1
META_FILE = "lowbit.json"


def _pack_flat(values: torch.Tensor, bits: int) -> np.ndarray:
    """Pack a whole tensor as one bit stream, zero-padded to a byte boundary."""
    flat = values.reshape(-1).numpy().astype(np.uint8)
    pad = 0
    while (flat.size + pad) * bits % 8:
        pad += 1
    return pack_bits(np.concatenate([flat, np.zeros(pad, np.uint8)])[None], bits)[0]


class LowbitWriter:
    """Streams quantized and passthrough tensors into a checkpoint folder (an atomic temp dir)."""

    def __init__(self, tmp_dir: Path, source: ModelFolder):
        self.dir = tmp_dir
        self.source = source
        self.shards = ShardedWriter(tmp_dir, metadata={"format": FORMAT_NAME})
        self.tensors: dict[str, dict[str, Any]] = {}

    def add_quantized(self, name: str, qt: QuantizedTensor) -> None:
        base = name.removesuffix(".weight")
        bits = qt.config.bits
        self.shards.add(f"{base}.qweight", pack_bits(qt.codes, bits))
        self.shards.add(f"{base}.scales", qt.scales.contiguous())
        if not qt.config.symmetric:
            self.shards.add(f"{base}.qzeros", _pack_flat(qt.zeros, bits))
        if qt.g_idx is not None:
            self.shards.add(f"{base}.g_idx", qt.g_idx.to(torch.int32))
        self.tensors[name] = {"shape": list(qt.shape), "bits": bits, "group_size": qt.config.group_size,
                              "symmetric": qt.config.symmetric, "act_order": qt.g_idx is not None}

    def stored_name(self, name: str) -> str:
        """The tensor that carries source tensor `name`: X.qweight for a quantized X.weight."""
        return f"{name.removesuffix('.weight')}.qweight" if name in self.tensors else name

    def add_plain(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.add(name, tensor)

    def close(self, meta: dict[str, Any]) -> None:
        check_nothing_dropped(expected_tensor_names(self.source.arch, self.source.spec), self.shards.names,
                              self.stored_name, "the lowbit checkpoint")
        self.shards.close()
        for f in self.source.tokenizer_files():
            shutil.copy2(f, self.dir / f.name)
        shutil.copy2(self.source.path / "config.json", self.dir / "config.json")
        doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta, "tensors": self.tensors}
        (self.dir / META_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))


class LowbitCheckpoint(StoredWeights):
    """Reader for a lowbit checkpoint; also a WeightSource that dequantizes layer by layer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise LowbitError(f"{self.path}: not a lowbit checkpoint ({META_FILE} missing); "
                              "pass a folder written by `lowbit quantize`")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise LowbitError(f"{meta_path}: invalid JSON ({exc}); re-run lowbit quantize") from None
        if self.meta.get("format") != FORMAT_NAME or self.meta.get("version") != FORMAT_VERSION:
            raise LowbitError(f"{meta_path}: unsupported checkpoint format/version")
        self.config = json.loads((self.path / "config.json").read_text())
        check_remote_code(self.config, str(self.path / "config.json"))
        self.store = TensorStore(self.path)
        self.spec = spec_from_config(self.config, arch_for(self.config.get("model_type"), str(meta_path)),
                                     self.path / "config.json")

    @property
    def quantized_names(self) -> list[str]:
        return list(self.meta["tensors"])

    def quantized(self, name: str) -> QuantizedTensor:
        info = self.meta["tensors"][name]
        base = name.removesuffix(".weight")
        cfg = GridConfig(info["bits"], info["group_size"], info["symmetric"])
        out, n_in = info["shape"]
        codes = torch.from_numpy(unpack_bits(self.store.raw(f"{base}.qweight").numpy(), cfg.bits, n_in))
        scales = self.store.raw(f"{base}.scales")
        n_groups = scales.shape[1]
        if cfg.symmetric:
            zeros = torch.full((out, n_groups), cfg.sym_zero, dtype=torch.uint8)
        else:
            packed = self.store.raw(f"{base}.qzeros").numpy()[None]
            zeros = torch.from_numpy(unpack_bits(packed, cfg.bits, packed.shape[1] * 8 // cfg.bits)[0, : out * n_groups]
                                     .reshape(out, n_groups).copy())
        g_idx = self.store.raw(f"{base}.g_idx") if info.get("act_order") else None
        return QuantizedTensor(codes, scales, zeros, cfg, g_idx)

    def tensor(self, name: str) -> torch.Tensor:
        """Any weight as float32: dequantized if it was quantized, else as stored."""
        if name in self.meta["tensors"]:
            return self.quantized(name).dequantize()
        return self.store.get(name)
