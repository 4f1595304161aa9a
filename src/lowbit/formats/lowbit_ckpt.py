"""lowbit's own checkpoint: packed codes + fp16 scales + packed zeros, and a JSON of the run.

Layout of a checkpoint folder:
  lowbit.json                 format version, quant config, per-tensor grid, run stats
  model.safetensors (shards)  for each quantized linear X.weight:
                                X.qweight  uint8 bit stream of codes, row-major [out, in*bits/8]
                                X.scales   float16 [out, n_groups]
                                X.qzeros   uint8 bit stream of zero points (asymmetric grids only),
                                           or float16 [out, n_groups] for a float-zero grid
                                X.g_idx    int32 [in] (act-order only)
                              every other tensor unchanged
  config.json, tokenizer files copied from the source model

The format is exact: reading it back reproduces every code, scale and zero, so
evaluation of a checkpoint measures precisely what was written.
"""

from __future__ import annotations

import json
import math
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
from lowbit.model.hf import ModelFolder, expected_tensor_names, expected_tensor_shapes, spec_from_config
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
        if qt.config.float_zero:
            self.shards.add(f"{base}.qzeros", qt.zeros.to(torch.float16).contiguous())
        elif not qt.config.symmetric:
            self.shards.add(f"{base}.qzeros", _pack_flat(qt.zeros, bits))
        if qt.g_idx is not None:
            self.shards.add(f"{base}.g_idx", qt.g_idx.to(torch.int32))
        self.tensors[name] = {"shape": list(qt.shape), "bits": bits, "group_size": qt.config.group_size,
                              "symmetric": qt.config.symmetric, "act_order": qt.g_idx is not None}
        if qt.config.float_zero:
            self.tensors[name]["float_zero"] = True

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


FLOATS = ("F16", "BF16", "F32")


def _json_object(path: Path, fix: str) -> dict:
    """A JSON object from a checkpoint file, or a one-line error naming the file."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise LowbitError(f"{path}: cannot read ({exc.strerror}); {fix}") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5000-digit number, nesting too deep
        raise LowbitError(f"{path}: invalid JSON ({str(exc)[:160]}); {fix}") from None
    if not isinstance(doc, dict):
        raise LowbitError(f"{path}: must hold a JSON object; {fix}")
    return doc


class LowbitCheckpoint(StoredWeights):
    """Reader for a lowbit checkpoint; also a WeightSource that dequantizes layer by layer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise LowbitError(f"{self.path}: not a lowbit checkpoint ({META_FILE} missing); "
                              "pass a folder written by `lowbit quantize`")
        self.meta = _json_object(meta_path, "re-run lowbit quantize")
        if self.meta.get("format") != FORMAT_NAME or self.meta.get("version") != FORMAT_VERSION:
            raise LowbitError(f"{meta_path}: unsupported checkpoint format/version")
        self.config = _json_object(self.path / "config.json", "copy it from the source model")
        check_remote_code(self.config, str(self.path / "config.json"))
        self.store = TensorStore(self.path)
        self.spec = spec_from_config(self.config, arch_for(self.config.get("model_type"), str(meta_path)),
                                     self.path / "config.json")
        self._check_tensors(meta_path)

    def _check_tensors(self, meta_path: Path) -> None:
        """Every tensor of the model is stored with the shape config.json gives it, and every quantized one
        has a well-formed grid in lowbit.json and packed tensors of exactly the sizes that grid implies:
        dequantizing can then trust them, whatever the files claim."""
        tensors = self.meta.get("tensors")
        if not isinstance(tensors, dict):
            raise LowbitError(f"{meta_path}: 'tensors' must map each quantized tensor to its grid; re-run lowbit "
                              "quantize")
        want = expected_tensor_shapes(self.spec)
        for name, shape in want.items():
            problem = self._quantized_problem(name, tensors[name], shape) if name in tensors else \
                self._plain_problem(name, shape)
            if problem:
                raise LowbitError(f"{self.path}: tensor {name}: {problem}; re-run lowbit quantize")
        stray = [n for n in tensors if n not in want]
        if stray:
            raise LowbitError(f"{meta_path}: {str(stray[0])[:120]!r} is not a tensor of this model; re-run lowbit "
                              "quantize")

    def _plain_problem(self, name: str, shape: tuple[int, ...]) -> str | None:
        if name not in self.store:
            return "missing from the safetensors files"
        if self.store.dtypes[name] not in FLOATS or self.store.shapes[name] != shape:
            return f"{self.store.dtypes[name]} {list(self.store.shapes[name])}, not a float tensor of shape {list(shape)}"
        return None

    def _quantized_problem(self, name: str, info: object, shape: tuple[int, ...]) -> str | None:
        """What is wrong with a quantized tensor's entry and stored tensors (None: nothing)."""
        if len(shape) != 2:
            return "lowbit.json lists it as quantized, but lowbit quantizes only 2-D weights"
        try:
            cfg = GridConfig.from_meta(info)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, LowbitError):
            return "its grid (bits, group_size, symmetric) in lowbit.json is malformed"
        if info.get("shape") != list(shape):  # type: ignore[union-attr]
            return f"lowbit.json gives shape {str(info.get('shape'))[:40]}, config.json {list(shape)}"  # type: ignore
        out, n_in = shape
        n_groups = 1 if cfg.group_size == -1 else -(-n_in // cfg.group_size)
        base = name.removesuffix(".weight")
        need = {f"{base}.qweight": (("U8",), (out, n_in * cfg.bits // 8)),
                f"{base}.scales": (FLOATS, (out, n_groups))}
        if (n_in * cfg.bits) % 8:
            return f"{n_in} columns of {cfg.bits} bits do not fill whole bytes"
        if not cfg.symmetric:  # integer zeros: one bit stream, padded to whole bytes (_pack_flat)
            step = 8 // math.gcd(cfg.bits, 8)
            packed = -(-out * n_groups // step) * step * cfg.bits // 8
            need[f"{base}.qzeros"] = (FLOATS, (out, n_groups)) if cfg.float_zero else (("U8",), (packed,))
        if info.get("act_order"):  # type: ignore[union-attr]
            need[f"{base}.g_idx"] = (("I32", "I64"), (n_in,))
        for part, (dtypes, part_shape) in need.items():
            if part not in self.store:
                return f"{part} is missing"
            if self.store.dtypes[part] not in dtypes or self.store.shapes[part] != part_shape:
                return (f"{part} is {self.store.dtypes[part]} {list(self.store.shapes[part])}, not "
                        f"{'/'.join(dtypes)} {list(part_shape)}")
        if info.get("act_order"):  # type: ignore[union-attr]
            g = self.store.raw(f"{base}.g_idx")
            if g.numel() and not (0 <= int(g.min()) and int(g.max()) < n_groups):
                return f"{base}.g_idx names groups outside 0..{n_groups - 1}"
        return None

    @property
    def quantized_names(self) -> list[str]:
        return list(self.meta["tensors"])

    def quantized(self, name: str) -> QuantizedTensor:
        info = self.meta["tensors"][name]
        base = name.removesuffix(".weight")
        cfg = GridConfig.from_meta(info)
        out, n_in = info["shape"]
        codes = torch.from_numpy(unpack_bits(self.store.raw(f"{base}.qweight").numpy(), cfg.bits, n_in))
        scales = self.store.raw(f"{base}.scales")
        n_groups = scales.shape[1]
        if cfg.symmetric:
            zeros = torch.full((out, n_groups), cfg.sym_zero, dtype=torch.uint8)
        elif cfg.float_zero:
            zeros = self.store.raw(f"{base}.qzeros")
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
