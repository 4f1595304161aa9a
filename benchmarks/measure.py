"""Run a Python script as __main__ and record its own peak RSS (VmHWM) to a file.

Usage: python measure.py PEAK_FILE SCRIPT [ARGS...]
A forked child inherits its parent's pages until exec, so rusage of a child
overstates a big parent's children; VmHWM read inside the exec'd process is
the script's own high-water mark.
"""

from __future__ import annotations

import runpy
import sys


def peak_rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


if __name__ == "__main__":
    peak_file, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    with open(peak_file, "w") as fh:
        fh.write(str(peak_rss_kib()))
    sys.exit(code)
