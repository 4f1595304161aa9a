"""Write outputs under a temporary name and rename them when complete.

A killed run therefore never leaves a file or folder that looks finished, and a
failed one leaves nothing at all. The temporary lives beside the target so the
final rename stays on one filesystem (and so is atomic).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lowbit.errors import LowbitError


def check_writable_target(target: Path, overwrite: bool = False) -> None:
    """Fail early, before any work, if `target` cannot be produced."""
    parent = target.resolve().parent
    if target.exists() and not overwrite:
        raise LowbitError(f"{target}: already exists; pass --overwrite or choose another output path")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LowbitError(f"{target}: {probe} is a file, not a folder; choose a writable output path")
    if not os.access(probe, os.W_OK):
        raise LowbitError(f"{target}: output location is not writable; choose a writable output path")


def _make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LowbitError(f"{target}: cannot create its folder ({exc.strerror}); choose a writable path") from None


def _replace(tmp: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes `target` only if the block succeeds."""
    target = Path(target)
    _make_parent(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise LowbitError(f"{target}: cannot write output ({exc.strerror}); choose a writable path") from None
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary file path that becomes `target` only if the block succeeds."""
    target = Path(target)
    _make_parent(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    except OSError as exc:
        raise LowbitError(f"{target}: cannot write output ({exc.strerror}); choose a writable path") from None
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o644)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
