"""Wall time and peak memory of a command and every process it starts (lowbit's worker pool included).

Memory is the sum of PSS (proportional set size, /proc/PID/smaps_rollup) over the process tree,
sampled every `interval` seconds: forked workers share their parent's pages, which PSS counts once
across the tree where summing RSS would count them per process. A single-process peer (llama.cpp's
quantizer uses threads) is measured the same way, so the figures compare.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_pss_kib(root: int) -> int:
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
        todo += _children(pid)
    return total


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 0.25) -> tuple[float, float]:
    """(wall seconds, peak tree PSS MiB) of `cmd`; raises with the log's tail if it fails."""
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, **(env or {})})
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_pss_kib(proc.pid))
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        if code != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({code}):\n"
                               f"{log.read().decode(errors='replace')[-3000:]}")
        return wall, peak[0] / 1024
