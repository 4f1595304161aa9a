"""Lazy reading and sharded, atomic writing of safetensors, shared by every format.

Readers open shards on demand and validate headers against file sizes; the
writer flushes a shard whenever the buffer passes `max_shard_bytes`, so a
quantizer streaming a large model never holds more than one shard of output.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse one shard's header and prove the file holds every byte it promises."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise LowbitError(f"{path}: file is truncated (no safetensors header); re-download it")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise LowbitError(f"{path}: file is truncated inside its header; re-download it")
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise LowbitError(f"{path}: cannot read ({exc.strerror})") from None
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a 5000-digit number, nesting too deep
        raise LowbitError(f"{path}: not a safetensors file (bad header); re-download it") from None
    if not isinstance(header, dict):
        raise LowbitError(f"{path}: not a safetensors file (its header is not a JSON object); re-download it")
    header.pop("__metadata__", None)
    for name, info in header.items():
        _check_entry(path, name, info)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + header_len + end > size:
        raise LowbitError(
            f"{path}: file is truncated ({size} bytes, header needs {8 + header_len + end}); re-download it"
        )
    return header


def _whole_numbers(v: object, n: int | None = None) -> bool:
    return (isinstance(v, list) and (n is None or len(v) == n)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))


def _check_entry(path: Path, name: str, info: object) -> None:
    """One tensor's header entry is well formed, and its byte range holds exactly its shape in its dtype:
    a header may then be trusted for reading, reshaping and sizing, whatever numbers it claims. Its name
    must be printable: errors name tensors, and a newline in one would break the one-line error."""
    if not name.isprintable():
        raise LowbitError(f"{path}: tensor name {name[:200]!r} holds control characters; re-download it")
    if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and _whole_numbers(info.get("shape"))
            and _whole_numbers(info.get("data_offsets"), 2) and info["data_offsets"][0] <= info["data_offsets"][1]):
        raise LowbitError(f"{path}: tensor {name[:200]!r} has a malformed header entry (it needs dtype, shape and "
                          "data_offsets [start, end]); re-download it")
    item = ITEM_BYTES.get(info["dtype"])
    start, end = info["data_offsets"]
    if item is not None and end - start != math.prod(info["shape"]) * item:
        raise LowbitError(f"{path}: tensor {name[:200]!r} holds {end - start} bytes, but shape {info['shape']} in "
                          f"{info['dtype']} needs {math.prod(info['shape']) * item}; re-download it")


def is_plain_file_name(name: object) -> bool:
    """A name from an input file that may be joined onto its folder: one plain path component, no
    separators, no `..`, nothing absolute, no NUL (so it can neither leave the folder nor climb out),
    printable (a newline in it would break the one-line error that names it) and short enough for the
    file system (255 bytes, with no unpaired surrogate that the OS cannot encode)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and name.isprintable() and _encodable(name, 255)
            and not Path(name).is_absolute() and Path(name).name == name)


def _encodable(name: str, limit: int) -> bool:
    try:
        return len(os.fsencode(name)) <= limit
    except UnicodeEncodeError:
        return False


def shard_files(folder: Path) -> list[Path]:
    """The safetensors shards of a folder, via its index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = set(weight_map.values())
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
            raise LowbitError(f"{index}: invalid index ({exc!r}); re-download it") from None
        for name in sorted(names, key=str):
            if not is_plain_file_name(name):
                raise LowbitError(f"{index}: shard name {str(name)[:200]!r} is not a file name inside {folder}; "
                                  "lowbit reads shards only from the model folder itself; fix or re-download the "
                                  "index")
        files = sorted({folder / f for f in names})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise LowbitError(f"{missing[0]}: shard listed in {index.name} is missing; re-download it")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{folder}: no *.safetensors weights found; lowbit reads safetensors checkpoints")
    return files


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}
# Bytes per element of every safetensors dtype (those lowbit reads and the rest of the format's list).
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class TensorStore:
    """Name -> tensor over a folder's shards, read one tensor (or a range of its rows) at a time.

    Tensors are read with plain positioned reads into fresh memory, not through a memory map: a
    mapped shard's touched pages stay resident (and count in RSS) until the kernel needs them, so
    walking a 28 GB model through mmap looks like, and under cgroup limits behaves like, holding it.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Path] = {}
        self.dtypes: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for shard in shard_files(folder):
            header = read_safetensors_header(shard)
            base = 8 + _header_len(shard)
            for name, info in header.items():
                self.files[name] = shard
                self.dtypes[name] = info["dtype"]
                self.shapes[name] = tuple(info["shape"])
                start, end = info["data_offsets"]
                self._offsets[name] = (base + int(start), base + int(end))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor exactly as stored."""
        return self._read(name, 0, None).reshape(self.shapes[name])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor as stored (row-major, so one contiguous read)."""
        shape = self.shapes[name] if name in self.files else ()
        row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        t = self._read(name, start * row, (stop - start) * row)
        return t.reshape((stop - start, *shape[1:]) if shape else ())

    def _read(self, name: str, first: int, count: int | None) -> torch.Tensor:
        if name not in self.files:
            raise LowbitError(f"{self.folder}: tensor {name} not found in the safetensors files")
        dtype = DTYPES.get(self.dtypes[name])
        if dtype is None:
            raise LowbitError(f"{self.files[name]}: tensor {name} has dtype {self.dtypes[name]}, which lowbit "
                              "does not read")
        item = torch.empty((), dtype=dtype).element_size()
        begin, end = self._offsets[name]
        count = (end - begin) // item if count is None else count
        buf = torch.empty(count, dtype=dtype)
        if count:
            with self.files[name].open("rb", buffering=0) as fh:
                fh.seek(begin + first * item)
                view = memoryview(buf.view(torch.uint8).numpy())
                got = 0
                while got < len(view):
                    n = fh.readinto(view[got:])
                    if not n:
                        raise LowbitError(f"{self.files[name]}: file ended inside tensor {name}; re-download it")
                    got += n
        return buf

    def get(self, name: str) -> torch.Tensor:
        """Floating tensors as float32, integer ones unchanged."""
        t = self.raw(name)
        return t.float() if t.is_floating_point() else t


def _header_len(path: Path) -> int:
    with path.open("rb") as fh:
        return struct.unpack("<Q", fh.read(8))[0]


# At most this much output is buffered before a shard is written: well inside the 1.5 GiB a run may
# use beyond its largest layer and its activations, so a model of any size exports in bounded memory.
SHARD_BYTES = 512 << 20


def sort_header_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its keys sorted, in place.

    safetensors stores `__metadata__` in a hash map, so a file with two or more metadata keys comes out
    in a different key order from one process to the next; sorting makes the same inputs give the same
    bytes. The header keeps its length (same keys, same values), so the data offsets do not move."""
    with open(path, "r+b") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        raw = fh.read(n)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        ordered = {k: header[k] for k in ["__metadata__"] + sorted(k for k in header if k != "__metadata__")
                   if k in header}
        text = json.dumps(ordered, separators=(",", ":")).encode()
        if len(text) > n:
            raise LowbitError(f"{path}: safetensors header grew when sorted; please report this")
        fh.seek(8)
        fh.write(text + b" " * (n - len(text)))


class ShardedWriter:
    """Buffer tensors and write them as model.safetensors or model-0000k-of-0000N shards plus an index."""

    def __init__(self, folder: Path, max_shard_bytes: int = SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.names: set[str] = set()  # every tensor added, for the writers' nothing-dropped check

    def add(self, name: str, tensor: torch.Tensor | np.ndarray) -> None:
        t = torch.from_numpy(np.ascontiguousarray(tensor)) if isinstance(tensor, np.ndarray) else tensor
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        self._buffer[name] = t
        self.names.add(name)
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._buffer, str(path), metadata=self.metadata)
        self._written.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is buffered and give shards their final names."""
        if self._buffer or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            final = self.folder / "model.safetensors"
            self._written[0][0].rename(final)
            return [final]
        weight_map: dict[str, str] = {}
        finals = []
        for k, (path, names) in enumerate(self._written, start=1):
            final = self.folder / f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update({nm: final.name for nm in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return finals
