"""Write outputs under a temporary name and rename them when complete.

A killed run therefore never leaves a file or folder that looks finished, and a
failed one leaves nothing at all. The temporary lives beside the target so the
final rename stays on one filesystem (and so is atomic).

One process at a time writes a given output: every writer holds an exclusive
flock on `.OUT.lock` beside OUT (the same lock covers the `.OUT.partial` folder
of a resumable run) while it works, and a second lowbit process is refused with
one line. The kernel drops a flock when its holder exits or is killed, so a
crashed run never blocks the next one; a stale lock file is simply re-locked.

A full disk (ENOSPC, or a quota) while writing becomes one DiskFull line (a LowbitError, exit 2)
after the temporary is removed, so nothing is left at OUT. A resumable run's `.OUT.partial` folder
is different: its finished layers are kept (they cost hours), the command that failed says so,
and the same command resumes once there is space; deleting the folder throws them away.

Shared caches (FP reference logits, task answers, the materialised default model) are not outputs:
any number of processes may want the same entry. cache_fill_lock makes them fill it one at a time,
so the second waits and then finds the entry complete instead of racing the first one's rename.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

from lowbit.errors import LowbitError


class DiskFull(LowbitError):
    """The filesystem ran out of space (or quota) while lowbit was writing; the message names the output."""


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# how a full disk reads when it arrives without an errno: safetensors' Rust I/O error, and numpy's tofile
# short write ("N requested and M written"), which it raises as a bare OSError
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)|\d+ requested and \d+ written")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or the user's quota) is full, whichever library raised it."""
    if isinstance(exc, LowbitError):  # already reported (a DiskFull names its own output)
        return False
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    return isinstance(exc, Exception) and bool(_FULL_TEXT.search(str(exc)))


def _free_space(path: Path) -> str:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free / 1024:.0f} KiB"


def disk_full_error(target: Path, doing: str = "writing it") -> DiskFull:
    """The one-line error of a full disk while `doing` something for output `target`."""
    return DiskFull(f"{target}: no space left on device while {doing} ({_free_space(Path(target).parent)} free "
                    f"there; nothing was left at {target}); free some space and run the same command again")


# the `.OUT.partial` folders of resumable runs in progress in this process (PartialRun registers
# them with the release of its output lock), so the CLI can say what an interrupted or failed run
# kept, and drop its lock when the command ends rather than whenever the run object is collected
_PARTIALS: dict[Path, Callable[[], None]] = {}


def track_partial(folder: Path, release: Callable[[], None]) -> None:
    _PARTIALS[Path(folder)] = release


def untrack_partial(folder: Path) -> None:
    _PARTIALS.pop(Path(folder), None)


def kept_partials() -> list[Path]:
    """Partial folders registered by this process that still exist on disk (and so are resumable)."""
    return [p for p in _PARTIALS if p.is_dir()]


def release_partials() -> None:
    """Release the output locks of the runs this process left unfinished (the command is over)."""
    for release in list(_PARTIALS.values()):
        release()
    _PARTIALS.clear()


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
    try:
        fd = _open_locked(lock, blocking=False)
    except BlockingIOError:
        raise _busy(target, lock) from None
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(target, f"creating its lock file {lock.name}") from None
        raise LowbitError(f"{target}: cannot create its lock file {lock.name} ({exc.strerror}); "
                          "choose a writable output path") from None
    try:  # the holder's pid, for the refusal message only: a full disk must not stop the run here
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass
    _HELD[key] = [fd, 1]
    remove_stale_temps(target)
    return key


def remove_stale_temps(target: Path) -> None:
    """Delete the temporaries a killed writer of `target` left beside it (`.OUT.tmp-*`, `.OUT.old-*`).

    Only called while holding target's lock, so no live process can be writing them."""
    target = Path(target)
    # exactly the names tempfile (8 random characters) and _replace (a pid) give them, nothing longer
    mine = re.compile(re.escape(f".{target.name}.") + r"(tmp-[a-z0-9_]{8}|old-\d+)")
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if mine.fullmatch(stale.name):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() and not stale.is_symlink() else \
                stale.unlink(missing_ok=True)


def _open_locked(lock: Path, blocking: bool) -> int:
    """An fd holding the exclusive flock of the file now at `lock` (created if need be).

    Raises BlockingIOError when another process holds it and not `blocking`."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have unlinked the file after we opened it: lock the live one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def cache_fill_lock(entry: Path) -> Iterator[None]:
    """Hold the exclusive lock of shared cache entry `entry` (`.ENTRY.lock` beside it), waiting for it.

    Callers check for a complete entry, take this lock, check again, and only then fill it: two
    processes wanting the same entry compute it once, and a complete entry is never replaced under a
    reader. Temporaries left by a filler that was killed are removed here, since nobody else can be
    writing them while we hold the lock."""
    entry = Path(entry)
    lock = lock_path(entry)
    _make_parent(lock)
    fd = _open_locked(lock, blocking=True)
    try:
        remove_stale_temps(entry)
        yield
    finally:
        try:
            os.unlink(lock)  # while still locked, as release_output_lock does
        except OSError:
            pass
        os.close(fd)


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
        raise _cannot_write(target, exc) from None
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        _replace(tmp, target)
    except BaseException as exc:
        full = disk_full_error(target) if is_disk_full(exc) else None  # the free space before the cleanup
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise


def _cannot_write(target: Path, exc: OSError) -> LowbitError:
    if is_disk_full(exc):
        return disk_full_error(target)
    return LowbitError(f"{target}: cannot write output ({exc.strerror}); choose a writable path")


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
        raise _cannot_write(target, exc) from None
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o644)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        full = disk_full_error(target) if is_disk_full(exc) else None  # the free space before the cleanup
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from None
        raise
