"""llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python) as a peer and a judge.

An importance matrix is passed the way llama-quantize passes one: per weight,
the mean of x^2 of each input column, as a NULL-terminated
llama_model_imatrix_data array keyed by llama.cpp tensor name.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.formats.gguf import hf_name_to_gguf
from lowbit.formats.imatrix import Imatrix, read_imatrix


def _imatrix_array(imatrix: Imatrix):
    """(entries, buffers): the C array and the Python objects that must outlive the call."""
    import llama_cpp

    keep: list = []
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, name in enumerate(sorted(imatrix)):
        mean = np.ascontiguousarray(imatrix[name].mean(), dtype=np.float32)
        cname = ctypes.c_char_p(hf_name_to_gguf(name).encode())
        keep += [mean, cname]
        entries[i].name = cname
        entries[i].data = mean.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = mean.size
    return entries, keep


def llamacpp_quantize(src: Path, dst: Path, file_type: str, imatrix: Path | Imatrix | None = None,
                      nthread: int = 2) -> Path:
    """Quantize the GGUF `src` to `dst` with llama.cpp's quantizer (LLAMA_FTYPE_MOSTLY_<file_type>)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}", None)
    if ftype is None:
        raise LowbitError(f"llama.cpp has no file type {file_type!r}")
    params.ftype = ftype
    params.nthread = nthread
    keep = None
    if imatrix is not None:
        imat = read_imatrix(Path(imatrix)) if isinstance(imatrix, (str, Path)) else imatrix
        entries, keep = _imatrix_array(imat)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise LowbitError(f"llama.cpp could not quantize {src} to {file_type} (return code {rc})")
    return Path(dst)
