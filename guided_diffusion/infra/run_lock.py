"""One writer per run dir: an exclusive lock held for the life of the process, and no fresh run over old ones.

The lock is an advisory `flock` on `<run_dir>/.run.lock`; the operating system drops it when the process ends
however it ends, so a killed run never blocks its own resume. A second process (a duplicate launch, a requeued
job while the first still runs) is refused instead of interleaving checkpoints or deleting in-flight files.
Files that several runs share (the pool caches) get a lock of their own while one of them writes
(`shared_file_writer`).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import socket
from collections.abc import Iterator
from typing import IO

from .. import logger
from .checkpoint import remove_stale_temp_files

LOCK_NAME = ".run.lock"
CHECKPOINT_PATTERNS = ("latest", "model[0-9]*.pt", "ema_*_[0-9]*.pt", "opt[0-9]*.pt")

_held: dict[str, IO[str]] = {}  # run dir -> open lock file, kept for the life of the process


def holds_checkpoints(run_dir: str) -> bool:
    """Whether `run_dir` already holds a training run's checkpoints (or its `latest` pointer)."""
    return any(glob.glob(os.path.join(glob.escape(run_dir), pattern)) for pattern in CHECKPOINT_PATTERNS)


def claim_run_dir(run_dir: str, allow_checkpoints: bool) -> str | None:
    """Lock `run_dir` for this process; return None, or a one-line reason why this run must not write there.

    Refused: a dir another live process holds, and, unless `allow_checkpoints` (a resume, or a run that
    writes no checkpoints), a dir that already holds checkpoints, which a fresh training run would overwrite
    and whose `latest` it would rewind.
    """
    run_dir = os.path.abspath(run_dir)
    if run_dir in _held:
        return None
    try:
        os.makedirs(run_dir, exist_ok=True)
        handle = open(os.path.join(run_dir, LOCK_NAME), "a+")
    except OSError as exc:
        return f"cannot write to run dir {run_dir} ({exc.strerror})"
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        return f"run dir {run_dir} is in use by {owner}; one run writes to a run dir at a time"
    if not allow_checkpoints and holds_checkpoints(run_dir):
        handle.close()
        return (
            f"run dir {run_dir} already holds a run's checkpoints; pass --resume_checkpoint {run_dir} "
            "to continue it, or choose another --exp_dir"
        )
    _record_owner(handle)
    _held[run_dir] = handle
    remove_stale_temp_files(run_dir)  # we hold the dir: any temp file in it is a killed writer's
    return None


def _record_owner(handle: IO[str]) -> None:
    """Write this process as the holder of the flocked `handle` (what a waiting or refused writer reports)."""
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()


def release_run_dir(run_dir: str) -> None:
    """Give the lock back before the process ends (tests and in-process tools that run several runs)."""
    handle = _held.pop(os.path.abspath(run_dir), None)
    if handle is not None:
        handle.close()


@contextlib.contextmanager
def shared_file_writer(path: str) -> Iterator[None]:
    """Hold `<path>.lock` (an flock recording host and pid) while this process writes `path`, a file other
    runs may write too. Another live writer of `path` is waited for; once the lock is ours no process can be
    writing `path`, so every temp file of it in the folder is a killed writer's and goes at once, whatever
    its age. The lock file stays (deleting an flocked file lets a third process lock a different inode)."""
    path = os.path.abspath(path)
    with open(f"{path}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            logger.log(f"waiting for {owner}, which is writing {path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        _record_owner(handle)
        try:
            remove_stale_temp_files(os.path.dirname(path), path)
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
