"""Importance matrix: per-input-column sum of x^2 and a token count for every linear layer.

Two files with the same content:
  * llama.cpp's imatrix GGUF: `general.type = imatrix`, `imatrix.datasets`,
    `imatrix.chunk_count`, `imatrix.chunk_size`, and for each weight (llama.cpp
    tensor name) an F32 `<name>.in_sum2` [n_in] and `<name>.counts` [1];
  * lowbit's own safetensors with the same two tensors per weight under HF names.
llama.cpp's quantizer consumes the mean, in_sum2 / counts, per column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from lowbit.errors import LowbitError
from lowbit.formats.atomic import atomic_file
from lowbit.formats.gguf import gguf_name_to_hf, hf_name_to_gguf, open_gguf


@dataclass
class ImatrixEntry:
    in_sum2: np.ndarray  # float32 [n_in]
    count: float

    def mean(self) -> np.ndarray:
        return (self.in_sum2 / max(self.count, 1.0)).astype(np.float32)


Imatrix = dict[str, ImatrixEntry]  # keyed by HF weight name


def write_imatrix_gguf(path: Path, imatrix: Imatrix, datasets: list[str], chunk_count: int, chunk_size: int) -> None:
    import gguf

    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="llama")
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", datasets)
        w.add_uint32("imatrix.chunk_count", chunk_count)
        w.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(imatrix):
            e = imatrix[name]
            base = hf_name_to_gguf(name)
            w.add_tensor(f"{base}.in_sum2", e.in_sum2.astype(np.float32))
            w.add_tensor(f"{base}.counts", np.array([e.count], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def read_imatrix_gguf(path: Path) -> Imatrix:
    reader = open_gguf(path)
    if reader.fields.get("general.type") is None or reader.fields["general.type"].contents() != "imatrix":
        raise LowbitError(f"{path}: not an imatrix GGUF (general.type is not 'imatrix')")
    sums, counts = {}, {}
    for t in reader.tensors:
        base, kind = t.name.rsplit(".", 1)
        target = sums if kind == "in_sum2" else counts if kind == "counts" else None
        if target is not None:
            target[gguf_name_to_hf(base)[0]] = np.array(t.data, dtype=np.float32).reshape(-1)
    if set(sums) != set(counts):
        raise LowbitError(f"{path}: imatrix has sums without counts (or the reverse); regenerate it")
    return {n: ImatrixEntry(sums[n], float(counts[n][0])) for n in sums}


def write_imatrix_lowbit(path: Path, imatrix: Imatrix, meta: dict) -> None:
    tensors = {}
    for name, e in imatrix.items():
        tensors[f"{name}.in_sum2"] = e.in_sum2.astype(np.float32)
        tensors[f"{name}.counts"] = np.array([e.count], dtype=np.float32)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "lowbit-imatrix", "meta": json.dumps(meta, sort_keys=True)})


def read_imatrix_lowbit(path: Path) -> Imatrix:
    t = load_file(str(path))
    names = {k.rsplit(".", 1)[0] for k in t}
    return {n: ImatrixEntry(t[f"{n}.in_sum2"], float(t[f"{n}.counts"][0])) for n in names}


def read_imatrix(path: Path) -> Imatrix:
    """Either file format, by suffix."""
    if not Path(path).is_file():
        raise LowbitError(f"{path}: imatrix file not found")
    return read_imatrix_gguf(Path(path)) if str(path).endswith(".gguf") else read_imatrix_lowbit(Path(path))


def from_layer_sums(name: str, sumsq: torch.Tensor, count: int) -> ImatrixEntry:
    return ImatrixEntry(sumsq.double().numpy().astype(np.float32), float(count))
