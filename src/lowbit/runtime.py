"""Process-level knobs for running torch on small CPUs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def single_thread() -> Iterator[None]:
    """Run a block of many small tensor ops on one thread.

    Column-by-column loops (GPTQ) and grid searches issue thousands of tiny ops;
    with two OpenMP threads each op pays a barrier, and when another process
    holds a core the barrier waits for a descheduled thread: measured 35.8 s vs
    1.7 s for one GPTQ matrix on a loaded 2-core machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
