"""Write outputs under a temporary name and rename them when complete.

A killed run therefore never leaves a file or folder that looks finished, and a
failed one leaves nothing at all. The temporary lives beside the target so the
final rename stays on one filesystem (and so is atomic).

One process at a time writes a given output: every writer holds an exclusive
flock on `.OUT.lock` beside OUT (the same lock covers the `.OUT.partial` folder
of a resumable run) while it works, and a second lowbit process is refused with
one line. The kernel drops a flock when its holder exits or is killed, so a
crashed run never blocks the next one; a stale lock file is simply re-locked.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from lowbit.errors import LowbitError


def lock_path(target: Path) -> Path:
    """The lock file of an output: `.OUT.lock` beside it (shared by OUT and `.OUT.partial`)."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


# lock file (absolute) -> [fd, depth]: the locks this process holds; re-entrant, since a resumable
# run holds its output's lock for the whole run and its final atomic write takes it again
_HELD: dict[str, list[int]] = {}


def _busy(target: Path, lock: Path) -> LowbitError:
    try:
        holder = lock.read_text().strip()
    except OSError:
        holder = ""
    who = f"process {holder}" if holder.isdigit() else "process"
    return LowbitError(f"{target}: another lowbit {who} is writing it (lock {lock}); wait for it to finish, "
                       "or choose another output path")


def acquire_output_lock(target: Path) -> str:
    """Take the exclusive lock of `target` (non-blocking); a held lock is a one-line LowbitError.

    Creates target's folder if need be. Returns the key to pass to release_output_lock. Locking an
    output this process already holds only deepens it."""
    lock = lock_path(target)
    key = os.path.abspath(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    _make_parent(lock)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LowbitError(f"{target}: cannot create its lock file {lock.name} ({exc.strerror}); "
                              "choose a writable output path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(target, lock) from None
        try:  # the holder before us may have unlinked the file after we opened it: lock the live one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1]
    return key


def release_output_lock(key: str) -> None:
    """Undo one acquire_output_lock; the last one removes the lock file and drops the lock."""
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[key]
    try:
        os.unlink(key)  # while still locked, so nobody can be holding this inode after us
    except OSError:
        pass
    os.close(held[0])


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold `target`'s exclusive lock for the block (see acquire_output_lock)."""
    key = acquire_output_lock(target)
    try:
        yield
    finally:
        release_output_lock(key)


def check_writable_target(target: Path, overwrite: bool = False) -> None:
    """Fail early, before any work, if `target` cannot be produced (or another process is writing it)."""
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
    if parent.is_dir():  # refuse now, not after hours of work, if another process holds the output
        release_output_lock(acquire_output_lock(target))


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
def atomic_dir(target: Path, lock: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes `target` only if the block succeeds.

    `lock` holds target's output lock meanwhile; caches that processes may fill at once pass False."""
    target = Path(target)
    _make_parent(target)
    with output_lock(target) if lock else nullcontext():
        yield from _atomic_dir(target)


def _atomic_dir(target: Path) -> Iterator[Path]:
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
def atomic_file(target: Path, lock: bool = True) -> Iterator[Path]:
    """Yield a temporary file path that becomes `target` only if the block succeeds.

    `lock` holds target's output lock meanwhile; caches that processes may fill at once pass False."""
    target = Path(target)
    _make_parent(target)
    with output_lock(target) if lock else nullcontext():
        yield from _atomic_file(target)


def _atomic_file(target: Path) -> Iterator[Path]:
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
