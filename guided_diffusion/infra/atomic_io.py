"""Atomic file writes: a reader (or a crash) sees either the old file, none, or the complete new one.

Every file this package writes that matters (checkpoints, caches, configs, npz batches, logs' CSV rewrites,
benchmark JSON) goes through `atomic_write`, so there is one place that knows how.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Callable
from typing import IO

FAULT_SLEEP_ENV = "GD_FAULT_SAVE_SLEEP"  # test hook: seconds to pause inside each atomic write; unset = inert
TEMP_SUFFIX = ".tmp"  # temp files are named ".<target name>.<random>.tmp" beside the target


def fsync_dir(dirpath: str | os.PathLike) -> None:
    """Flush a directory entry to disk so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(dirpath, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(binary file)` on a temp file beside `path`, fsync it, rename it over `path`, fsync the dir.

    The file gets mode 0644 (mkstemp's 0600 would make shared checkpoints unreadable to a group).
    """
    path = os.fspath(path)
    dirpath = os.path.dirname(os.path.abspath(path))
    os.makedirs(dirpath, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dirpath, prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if os.environ.get(FAULT_SLEEP_ENV):
                time.sleep(float(os.environ[FAULT_SLEEP_ENV]))  # lets fault tests kill a save mid-write
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if _disk_full(exc):
            message = f"disk full: no space left to write {path}; the previous file is kept"
            raise OSError(errno.ENOSPC, message) from exc
        raise
    fsync_dir(dirpath)


def _disk_full(exc: BaseException) -> bool:
    """Whether an exception or anything it chains to is ENOSPC (torch.save wraps it in a RuntimeError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
