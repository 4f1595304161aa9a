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
from lowbit.formats.safetensors_io import sort_header_metadata
from lowbit.formats.gguf import gguf_name_to_hf, hf_name_to_gguf, open_gguf


@dataclass
class ImatrixEntry:
    in_sum2: np.ndarray  # float32 [n_in]
    count: float

    def mean(self) -> np.ndarray:
        return (self.in_sum2 / max(self.count, 1.0)).astype(np.float32)


Imatrix = dict[str, ImatrixEntry]  # keyed by HF weight name


def write_imatrix_gguf(path: Path, imatrix: Imatrix, datasets: list[str], chunk_count: int, chunk_size: int) -> None:
    with atomic_file(path) as tmp:
        _gguf_to(tmp, imatrix, datasets, chunk_count, chunk_size)


def write_imatrix_pair(path: Path, twin: Path, imatrix: Imatrix, meta: dict) -> None:
    """`lowbit imatrix`'s two files, both written under temporary names and renamed only when both are
    complete: a full disk or a kill leaves neither rather than one without its twin."""
    with atomic_file(path) as tmp_gguf, atomic_file(twin) as tmp_twin:
        _gguf_to(tmp_gguf, imatrix, [meta["file"]], meta["samples"], meta["seqlen"])
        _lowbit_to(tmp_twin, imatrix, meta)


def _gguf_to(tmp: Path, imatrix: Imatrix, datasets: list[str], chunk_count: int, chunk_size: int) -> None:
    import gguf

    from lowbit.formats.gguf import close_writer_quietly

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
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except BaseException:
        close_writer_quietly(w)
        raise


def read_imatrix_gguf(path: Path) -> Imatrix:
    from lowbit.formats.gguf import _field

    reader = open_gguf(path)
    if _field(reader, "general.type") != "imatrix":
        raise LowbitError(f"{path}: not an imatrix GGUF (general.type is not 'imatrix')")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, _, kind = t.name.rpartition(".")
        if kind not in ("in_sum2", "counts"):
            continue
        if t.tensor_type.name != "F32":
            raise LowbitError(f"{path}: imatrix tensor {t.name} is {t.tensor_type.name}, not F32; regenerate it")
        try:
            name = gguf_name_to_hf(base)[0]
        except LowbitError:
            raise LowbitError(f"{path}: imatrix entry {base[:80]!r} names no Llama-family weight; regenerate it for "
                              "this model") from None
        parts.setdefault(name, {})[kind] = np.array(t.data, dtype=np.float32).reshape(-1)
    return _entries(parts, path)


def _entries(parts: dict[str, dict[str, np.ndarray]], path: Path) -> Imatrix:
    """Each weight's sums and count, both present, and usable as importance weights: a count and sums of
    squares are finite and never negative (the block search divides and weighs by them)."""
    out = {}
    for name, p in parts.items():
        if set(p) != {"in_sum2", "counts"}:
            raise LowbitError(f"{path}: imatrix has sums without counts (or the reverse) for {name[:120]!r}; regenerate it")
        sums, counts = p["in_sum2"], p["counts"]
        if not (sums.size and counts.size and np.isfinite(sums).all() and np.isfinite(counts).all()
                and (sums >= 0).all() and (counts >= 0).all()):
            raise LowbitError(f"{path}: imatrix entry {name[:120]!r} is empty, negative or not finite; regenerate it")
        out[name] = ImatrixEntry(sums, float(counts[0]))
    return out


def check_imatrix(imatrix: Imatrix, folder) -> None:
    """Every entry fits the model it weighs: as many columns as the weight has inputs. An imatrix of
    another model would otherwise fail inside the block search (or silently weigh the wrong columns)."""
    for name, e in imatrix.items():
        if folder.has(name) and e.in_sum2.size != folder.shape(name)[-1]:
            raise LowbitError(f"--imatrix: {name} has {e.in_sum2.size} columns but the model's weight has "
                              f"{folder.shape(name)[-1]} inputs; the imatrix was made for another model (compute "
                              "one for this model)")


def write_imatrix_lowbit(path: Path, imatrix: Imatrix, meta: dict) -> None:
    with atomic_file(path) as tmp:
        _lowbit_to(tmp, imatrix, meta)


def _lowbit_to(tmp: Path, imatrix: Imatrix, meta: dict) -> None:
    tensors = {}
    for name, e in imatrix.items():
        tensors[f"{name}.in_sum2"] = e.in_sum2.astype(np.float32)
        tensors[f"{name}.counts"] = np.array([e.count], dtype=np.float32)
    save_file(tensors, str(tmp), metadata={"format": "lowbit-imatrix", "meta": json.dumps(meta, sort_keys=True)})
    sort_header_metadata(tmp)  # two metadata keys: safetensors' own order varies by process


def read_imatrix_lowbit(path: Path) -> Imatrix:
    from safetensors import SafetensorError

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:  # TypeError: a dtype numpy lacks (BF16)
        raise LowbitError(f"{path}: not a readable imatrix safetensors ({' '.join(str(exc).split())[:160]}); "
                          "regenerate it") from None
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        base, _, kind = key.rpartition(".")
        if kind in ("in_sum2", "counts"):
            parts.setdefault(base, {})[kind] = np.asarray(value, dtype=np.float32).reshape(-1)
    return _entries(parts, path)


def read_imatrix(path: Path) -> Imatrix:
    """Either file format, by suffix."""
    if not Path(path).is_file():
        raise LowbitError(f"{path}: imatrix file not found")
    return read_imatrix_gguf(Path(path)) if str(path).endswith(".gguf") else read_imatrix_lowbit(Path(path))


def from_layer_sums(name: str, sumsq: torch.Tensor, count: int) -> ImatrixEntry:
    return ImatrixEntry(sumsq.double().numpy().astype(np.float32), float(count))
