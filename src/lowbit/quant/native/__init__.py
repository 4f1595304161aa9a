"""Compiled block-parameter searches (ggml_search.c), built once per host and loaded with ctypes.

Why compiled: the numpy searches in `ggml_blocks` keep ggml's float order by summing element after
element, so each trial is a few dozen numpy calls over small arrays; the C port does the same
arithmetic in the same order (float32, no FMA contraction, sums in index order) and is byte-identical,
which the tests check against the numpy reference and against llama.cpp itself.

Why built at first use instead of at install: lowbit installs editable from a source tree, and the
kernel is compiled with ``-march=native`` for the host it runs on, keyed by a hash of the source, the
compiler and the CPU's flags, so a cached library is never reused on a CPU that lacks an instruction
it uses. The library lands in ``<lowbit cache>/kernels/`` under a temporary name and is renamed when
complete, so concurrent first uses never load a half-written file.

When no C compiler is found, or ``LOWBIT_NATIVE=0``, `available()` is False and the numpy reference
runs instead: the same bytes, slower. One line on stderr says so once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("ggml_search.c")
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-march=native"]

_LIB: ctypes.CDLL | None = None
_TRIED = False

_f32p = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_i32p = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
_i64, _int, _f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_float

_SIGNATURES = {
    "lb_search_symmetric": [_f32p, ctypes.c_void_p, _i64, _int, _int, _f32p, _i32p],
    "lb_search_affine": [_f32p, _f32p, _i64, _int, _int, _f32, _f32, _int, _int, _f32p, _f32p, _i32p],
    "lb_search_symmetric_rmse": [_f32p, _i64, _int, _int, _f32p, _i32p],
    "lb_search_positive": [_f32p, _f32p, _i64, _int, _int, _f32p, _i32p],
    "lb_row_sum": [_f32p, _i64, _int, _int, _f32p],
    "lb_search_nonlinear": [_f32p, ctypes.c_void_p, _i64, _int, _f32p, _int, _int, _f32p],
    "lb_best_index": [_f32p, _i64, _f32p, _int, _i32p],
    "lb_search_grid": [_f32p, _f32p, _f32p, _f32p, _i64, _int, _int, _int, _int, _f32, _f32, _int, _int, _int,
                       _f32p, _i32p, np.ctypeslib.ndpointer(np.uint16, flags="C_CONTIGUOUS"), _f32p, _i32p],
}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def library_path(cc: str) -> Path:
    """Where the library for this source, compiler and CPU lives in the cache."""
    from lowbit.model.default import cache_dir

    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = cc
    key = hashlib.sha256(b"\0".join(s.encode() for s in (
        SOURCE.read_text(), version, " ".join(CFLAGS), _cpu_flags(), sys.platform))).hexdigest()[:16]
    return cache_dir() / "kernels" / f"ggml_search-{key}.so"


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE), "-lm"], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _load() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        print("lowbit: no C compiler found (set CC); the block searches run in numpy (same bytes, slower)",
              file=sys.stderr)
        return None
    path = library_path(cc)
    try:
        if not path.is_file():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        print(f"lowbit: could not build {SOURCE.name} with {cc} ({detail.strip().splitlines()[-1:]}); "
              "the block searches run in numpy (same bytes, slower)", file=sys.stderr)
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when it cannot be had."""
    global _LIB, _TRIED
    if not _TRIED:
        _TRIED = True
        _LIB = _load()
    return _LIB


def available() -> bool:
    if os.environ.get("LOWBIT_NATIVE", "1").strip() == "0":
        return False
    return library() is not None


# ---------------------------------------------------------------- lane-major wrappers ([N lanes, n])


MAX_LANE = 32  # ggml_search.c's MAXN: the longest lane (a legacy 32-element block)


def _f32(a: np.ndarray, longest: int = MAX_LANE) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim == 2 and a.shape[1] > longest:
        raise ValueError(f"lanes of {a.shape[1]} elements; the compiled searches take at most {MAX_LANE}")
    return a


def search_symmetric(x: np.ndarray, nmax: int, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    x = _f32(x)
    n_lanes, n = x.shape
    w = None if weights is None else _f32(weights)
    scale, codes = np.empty(n_lanes, np.float32), np.empty((n_lanes, n), np.int32)
    library().lb_search_symmetric(x, None if w is None else w.ctypes.data, n_lanes, n, nmax, scale, codes)
    return scale, codes


def search_affine(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                  use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, w = _f32(x), _f32(weights)
    n_lanes, n = x.shape
    scale, the_min = np.empty(n_lanes, np.float32), np.empty(n_lanes, np.float32)
    codes = np.empty((n_lanes, n), np.int32)
    library().lb_search_affine(x, w, n_lanes, n, nmax, rmin, rdelta, nstep, int(use_mad), scale, the_min, codes)
    return scale, the_min, codes


def search_symmetric_rmse(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    x = _f32(x)
    n_lanes, n = x.shape
    scale, codes = np.empty(n_lanes, np.float32), np.empty((n_lanes, n), np.int32)
    library().lb_search_symmetric_rmse(x, n_lanes, n, nmax, scale, codes)
    return scale, codes


def search_positive(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, w = _f32(x), _f32(weights)
    n_lanes, n = x.shape
    scale, codes = np.empty(n_lanes, np.float32), np.empty((n_lanes, n), np.int32)
    library().lb_search_positive(x, w, n_lanes, n, nmax, scale, codes)
    return scale, codes


def row_sum(a: np.ndarray, first: bool = False) -> np.ndarray:
    a = _f32(a, longest=1 << 62)
    out = np.empty(a.shape[0], np.float32)
    library().lb_row_sum(a, a.shape[0], a.shape[1], int(first), out)
    return out


def search_nonlinear(x: np.ndarray, weights: np.ndarray | None, levels: np.ndarray, ntry: int) -> np.ndarray:
    """IQ4's scale search per lane of [N, n] onto the ascending float32 `levels` (at most 16)."""
    x = _f32(x)
    n_lanes, n = x.shape
    w = None if weights is None else _f32(weights)
    lv = np.ascontiguousarray(levels, dtype=np.float32)
    if not 2 <= lv.size <= 16:
        raise ValueError(f"{lv.size} levels; the compiled search takes 2 to 16")
    scale = np.empty(n_lanes, np.float32)
    library().lb_search_nonlinear(x, None if w is None else w.ctypes.data, n_lanes, n, lv, lv.size, ntry, scale)
    return scale


def best_index(v: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8 of every value (any shape) among the ascending float32 `levels`, as int32."""
    v = np.asarray(v, dtype=np.float32)
    flat = np.ascontiguousarray(v.reshape(-1))
    lv = np.ascontiguousarray(levels, dtype=np.float32)
    out = np.empty(flat.size, np.int32)
    library().lb_best_index(flat, flat.size, lv, lv.size, out)
    return out.reshape(v.shape)


def search_grid(xval: np.ndarray, weights: np.ndarray, base: np.ndarray, start: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray]:
    """The grid i-quants' trials over lanes [N, n] (see lb_search_grid): (scale [N], grid index [N, n / group]).

    `grid` is the block type (ggml_blocks._GridIQ): its group / bits / top / center / step / ntrial /
    start_on_grid / redo settings and its tables (points, kmap, lists)."""
    x, w = _f32(xval), _f32(weights)
    n_lanes, n = x.shape
    if n % grid.group:
        raise ValueError(f"lanes of {n} elements; {grid.name} groups are {grid.group} wide")
    scale, index = np.empty(n_lanes, np.float32), np.empty((n_lanes, n // grid.group), np.int32)
    _, kmap, lists, _, _ = grid.tables
    library().lb_search_grid(x, w, np.ascontiguousarray(base, np.float32), np.ascontiguousarray(start, np.float32),
                             n_lanes, n, grid.group, grid.bits, grid.top, grid.center, grid.step, grid.ntrial,
                             int(grid.start_on_grid), grid.redo, grid.points, np.ascontiguousarray(kmap, np.int32),
                             np.ascontiguousarray(lists, np.uint16), scale, index)
    return scale, index
