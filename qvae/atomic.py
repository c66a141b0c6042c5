"""Atomic file writes: a temporary file in the same directory, fsync, then rename.

A crash mid-write leaves the previous file intact; readers never see a partial one. Used for
checkpoints, eval.json, metrics rewrites, the service's files and the embedding cache.

Two details a plain `mkstemp` + rename gets wrong:

- mode: `mkstemp` creates 0600 files; the result gets 0666 & ~umask, like any file `open()`
  creates, so group-readable run directories stay group-readable.
- leftovers: a process killed between `mkstemp` and the rename leaves `.NAME.XXXXXXXX.tmp`
  behind. Each write to NAME removes such leftovers of NAME, but only those no live writer holds:
  a writer keeps an exclusive `flock` on its temporary file until the rename, and a leftover is
  deleted only after taking that lock without waiting (locks die with their process). A writer
  whose fresh file was deleted in the instant before it took its lock sees it unlinked and
  starts over with a new one.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so leftovers are left alone
    fcntl = None  # type: ignore[assignment]

_UMASK_LOCK = threading.Lock()
#: mkstemp's random part: 8 characters of this alphabet (tempfile._RandomNameSequence).
_RANDOM = r"[a-z0-9_]{8}"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (/proc on Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere the only way to read it is to set it (briefly)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _lock(fd: int, *, wait: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete the temporary files of killed writes to `path` (none held by a live writer)."""
    path = Path(path)
    if fcntl is None:
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_RANDOM}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for entry in entries:
        if not (entry.name.startswith(f".{path.name}.") and pattern.fullmatch(entry.name)):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # gone already, a link, or not ours to read
            continue
        try:
            if not _lock(fd, wait=False):  # a live writer holds it
                continue
            # still the file we locked (not a new one that took the name)?
            if os.path.samestat(os.fstat(fd), os.lstat(entry.path)):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _open_temporary(path: Path) -> tuple[int, str]:
    """mkstemp beside `path`, locked, mode 0666 & ~umask; retried if a cleaner took it first."""
    mode = 0o666 & ~current_umask()
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        _lock(fd, wait=True)
        if os.fstat(fd).st_nlink > 0:
            break
        os.close(fd)  # deleted as a leftover before we locked it: take another name
    try:
        os.fchmod(fd, mode)
    except (AttributeError, OSError):  # no fchmod here: keep mkstemp's 0600
        pass
    return fd, tmp


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(fh)` on a temporary file, then replace `path` with it in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = _open_temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:  # closing it (after the rename) releases the lock
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda fh: fh.write(data))
