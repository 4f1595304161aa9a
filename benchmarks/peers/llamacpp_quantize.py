"""Run llama.cpp's own quantizer (llama_model_quantize, via llama-cpp-python) on a GGUF.

Usage: python llamacpp_quantize.py IN.gguf OUT.gguf TYPE [IMATRIX.gguf]
Runs as its own process so the harness can measure its wall time and peak RSS.
An imatrix GGUF (llama.cpp's format, e.g. from `lowbit imatrix`) is passed the
way llama-quantize does: per weight, the mean of x^2 per input column.
"""

from __future__ import annotations

import ctypes
import sys

import gguf
import llama_cpp
import numpy as np


def imatrix_array(path: str):
    """NULL-terminated llama_model_imatrix_data[] plus the buffers it points into (kept alive by the caller)."""
    reader = gguf.GGUFReader(path)
    sums, counts = {}, {}
    for t in reader.tensors:
        base, kind = t.name.rsplit(".", 1)
        (sums if kind == "in_sum2" else counts)[base] = np.array(t.data, dtype=np.float32).reshape(-1)
    keep = []
    entries = (llama_cpp.llama_model_imatrix_data * (len(sums) + 1))()
    for i, name in enumerate(sorted(sums)):
        mean = np.ascontiguousarray(sums[name] / max(float(counts[name][0]), 1.0), dtype=np.float32)
        cname = ctypes.c_char_p(name.encode())
        keep += [mean, cname]
        entries[i].name = cname
        entries[i].data = mean.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = mean.size
    return entries, keep


def main() -> int:
    src, dst, qtype = sys.argv[1:4]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = 2
    keep = None
    if len(sys.argv) > 4:
        entries, keep = imatrix_array(sys.argv[4])
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
