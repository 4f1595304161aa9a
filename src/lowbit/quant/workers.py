"""Independent tensor jobs spread over the machine's cores, one process per core.

A decoder layer's linears are independent once its statistics are gathered: RTN rounds each
tensor on its own, and GPTQ's four input groups (q/k/v, o, gate/up, down) each need only their own
Hessian. The block searches and the GPTQ column loop are long runs of small numpy/torch calls, so
threads would serialise on the GIL; separate processes scale with the cores, as llama-quantize's
threads do. Every job computes exactly what it would in the parent, so outputs are byte-identical
for any number of workers.

The pool is created once per process and reused by every later run. On Linux workers are forked
(spawning would re-run the caller's `__main__`, which breaks a user script without a main guard);
each sets torch to one thread before any work, the pattern torch's own DataLoader workers use.
Never used with a GPU: there the solves stay in the process that owns the device.
`LOWBIT_WORKERS=1` keeps everything in-process.
"""

from __future__ import annotations

import atexit
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Sequence

_POOL: ProcessPoolExecutor | None = None


def worker_count() -> int:
    """LOWBIT_WORKERS when set, else the cores this process may run on."""
    env = os.environ.get("LOWBIT_WORKERS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            from lowbit.errors import LowbitError

            raise LowbitError(f"LOWBIT_WORKERS={env!r}: must be a whole number of processes") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per process: the pool itself is the parallelism


def _pool(n: int) -> ProcessPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers != n:  # type: ignore[attr-defined]
        shutdown()
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        _POOL = ProcessPoolExecutor(max_workers=n, mp_context=get_context(method), initializer=_init_worker)
    return _POOL


def shutdown() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(cancel_futures=True)
        _POOL = None


atexit.register(shutdown)


def prestart() -> None:
    """Fork the workers now, before the caller loads any weights.

    A forked worker keeps every page its parent had at the fork: started in the middle of a layer it
    would pin that layer's float32 weights (1.1 GB at 13B) for the rest of the run, after the parent
    freed them. Quantizers call this first, while the process holds little beyond its imports."""
    n = worker_count()
    if n > 1:
        pool = _pool(n)
        for f in [pool.submit(int, 0) for _ in range(n)]:  # a job per worker makes each one fork now
            f.result()


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], costs: Sequence[float] | None = None) -> list[Any]:
    """fn(*job) for every job, in the jobs' order; in worker processes when there are several cores.

    `costs` (e.g. weights per job) start the largest jobs first, so two workers finish together."""
    n = min(worker_count(), len(jobs))
    if n <= 1:
        return [fn(*job) for job in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -(costs[i] if costs else 0))
    pool = _pool(worker_count())
    futures = {i: pool.submit(fn, *jobs[i]) for i in order}
    return [futures[i].result() for i in range(len(jobs))]
