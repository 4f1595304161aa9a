"""Element-wise kernels fused by torch.compile, with the same function run eagerly wherever it cannot be.

A chain of element-wise tensor ops costs one pass over memory per op in eager mode; on a small CPU, with
the weights of a whole decoder block as operands (AutoRound's fake quantization), those passes are most of
the time. torch.compile's inductor backend turns such a chain into one generated loop. It needs a C++
compiler on the CPU (Triton on a GPU) and takes a few seconds the first time per process (its on-disk
cache makes later processes quicker), so:
  * kernels compile with dynamic shapes: one compilation serves every linear of every block;
  * LOWBIT_COMPILE=0 in the environment turns it off (eager, same arithmetic);
  * a kernel whose compilation or first call fails falls back to eager for the rest of the process, with one
    line on stderr saying so; results never depend on which ran beyond float rounding in sums.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch

_KERNELS: dict[Callable, Callable] = {}


def enabled() -> bool:
    return os.environ.get("LOWBIT_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def kernel(fn: Callable) -> Callable:
    """`fn` compiled (or `fn` itself when compiling is off or has failed here)."""
    if fn not in _KERNELS:
        _KERNELS[fn] = _Guarded(fn) if enabled() and _compiler_available() else fn
    return _KERNELS[fn]


class _Guarded:
    """The compiled kernel; on any failure, eager from then on (the call that failed is rerun eagerly)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if self.compiled is None:
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run it eagerly
            self.compiled = None
            print(f"lowbit: torch.compile failed for {self.fn.__name__} ({type(exc).__name__}); running it "
                  "eagerly (set LOWBIT_COMPILE=0 to skip compiling)", file=sys.stderr)
            return self.fn(*args)


def _compiler_available() -> bool:
    try:
        import torch._inductor  # noqa: F401
    except Exception:  # noqa: BLE001 - a torch build without inductor
        return False
    return sys.platform != "win32" or bool(os.environ.get("CXX"))
