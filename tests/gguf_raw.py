"""A minimal GGUF v3 parser for the tests: each KV entry as its stored bytes, each tensor's type, shape
and data digest. Independent of lowbit's writer and far faster than gguf.GGUFReader on files with
large vocabularies (it does not build an array object per token)."""

from __future__ import annotations

import hashlib
import mmap
import struct
from functools import lru_cache
from pathlib import Path

# GGUF value type -> fixed size in bytes (8 = string, 9 = array handled apart)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_value(buf, pos: int, vtype: int) -> int:
    if vtype in _FIXED:
        return pos + _FIXED[vtype]
    if vtype == 8:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _FIXED:
            return pos + count * _FIXED[etype]
        for _ in range(count):
            pos = _skip_value(buf, pos, etype)
        return pos
    raise ValueError(f"GGUF value type {vtype}")


def _string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return bytes(buf[pos + 8:pos + 8 + n]).decode(), pos + 8 + n


@lru_cache(maxsize=None)
def read_gguf(path: Path) -> tuple[dict[str, bytes], dict[str, tuple[int, tuple[int, ...], str]]]:
    """({key: type + value bytes}, {tensor name: (ggml type id, shape, sha256 of its data)})."""
    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
        assert magic == 0x46554747 and version == 3, (path, hex(magic), version)
        pos, kv = 24, {}
        for _ in range(n_kv):
            key, pos = _string(buf, pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            end = _skip_value(buf, pos + 4, vtype)
            kv[key] = bytes(buf[pos:end])
            pos = end
        infos = []
        for _ in range(n_tensors):
            name, pos = _string(buf, pos)
            (ndim,) = struct.unpack_from("<I", buf, pos)
            shape = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            infos.append((name, ttype, tuple(shape), offset))
        align = struct.unpack_from("<I", kv["general.alignment"], 4)[0] if "general.alignment" in kv else 32
        start = -(-pos // align) * align
        tensors = {}
        for name, ttype, shape, offset in infos:
            block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            n = 1
            for d in shape:
                n *= d
            size = n // block * nbytes
            digest = hashlib.sha256(buf[start + offset:start + offset + size]).hexdigest()
            tensors[name] = (ttype, shape, digest)
    return kv, tensors
