"""Dynamic-batch cache files in the DKDM authors' layout, read without running arbitrary pickle code.

A cache is a pickled ``collections.defaultdict`` with ``total_t`` (int64 [N]) and ``total_x_t_1``
(float32 [N, C, H, W]). Item ``i`` holds the teacher state produced by its step at ``total_t[i]``;
its next teacher step is at ``total_t[i] - 1`` (``T`` = fresh noise, ``0`` = a clean sample).
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
from typing import BinaryIO, NoReturn

import numpy as np

from ...infra.atomic_io import atomic_write

CACHE_KEYS = ("total_t", "total_x_t_1")


class CacheError(Exception):
    """A cache file is missing, corrupt, refused by the safe loader, or holds inconsistent arrays."""


def _numpy_multiarray():
    """numpy's C multiarray module under whichever name this numpy uses (2.x: ``_core``, 1.x: ``core``)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _allowed_globals() -> dict[tuple[str, str], object]:
    """Exactly the globals the authors' caches reference, under numpy 1.x and 2.x module paths."""
    multiarray = _numpy_multiarray()
    allowed: dict[tuple[str, str], object] = {
        ("collections", "defaultdict"): collections.defaultdict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class _CacheUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` resolves only the cache layout's globals and refuses all others."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        super().__init__(file)
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise CacheError(
                f"{self._path}: refused to load global '{module}.{name}' (not part of a DKDM cache file)"
            ) from None

    def persistent_load(self, pid: object) -> NoReturn:
        raise CacheError(f"{self._path}: refused persistent id in cache file")


CHECKSUM_KEY = "sha256"


def _digest(total_t: np.ndarray, total_x_t_1: np.ndarray) -> str:
    """SHA-256 of both arrays' bytes (little-endian int64 steps, then float32 states)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(total_t, dtype="<i8"))  # buffers, not copies of a 630 MB pool
    digest.update(np.ascontiguousarray(total_x_t_1, dtype="<f4"))
    return digest.hexdigest()


# x_t = sqrt(alphabar) x0 + sqrt(1 - alphabar) eps with |x0| <= 1: even 1e9 Gaussian draws stay under 7.
MAX_ABS_STATE = 20.0


def validate_cache(path: str, total_t: np.ndarray, total_x_t_1: np.ndarray, T: int | None = None) -> None:
    """Check dtypes, shapes, (given ``T``) the step range 0..T, and that the states are finite and in a sane
    range; raise CacheError naming ``path``."""
    if not isinstance(total_t, np.ndarray) or not isinstance(total_x_t_1, np.ndarray):
        raise CacheError(f"{path}: total_t and total_x_t_1 must be numpy arrays")
    if total_t.ndim != 1 or total_t.dtype.kind not in "iu":
        raise CacheError(f"{path}: total_t must be a 1-D integer array, got {total_t.dtype} {total_t.shape}")
    if total_x_t_1.ndim != 4 or total_x_t_1.dtype.kind != "f":
        raise CacheError(
            f"{path}: total_x_t_1 must be a 4-D float array [N,C,H,W], got {total_x_t_1.dtype} "
            f"{total_x_t_1.shape}"
        )
    if total_t.shape[0] != total_x_t_1.shape[0]:
        raise CacheError(
            f"{path}: total_t has {total_t.shape[0]} items but total_x_t_1 has {total_x_t_1.shape[0]}"
        )
    if T is not None and total_t.size and (total_t.min() < 0 or total_t.max() > T):
        raise CacheError(
            f"{path}: total_t values span [{total_t.min()}, {total_t.max()}], outside 0..{T} for T={T}"
        )
    if not total_x_t_1.size:
        return
    # two reductions and no pool-sized temporaries; NaN and inf show in the extremes
    reach = max(float(total_x_t_1.max()), -float(total_x_t_1.min()))
    if not np.isfinite(reach):
        bad = int((~np.isfinite(total_x_t_1)).any(axis=(1, 2, 3)).sum())
        raise CacheError(f"{path}: {bad} of {total_x_t_1.shape[0]} teacher states hold NaN or inf values")
    if reach > MAX_ABS_STATE:
        raise CacheError(
            f"{path}: teacher states reach |x| = {reach:.3g}, beyond {MAX_ABS_STATE} "
            "(noisy images stay within about 7); the file is corrupt or not a pool of teacher states"
        )


def load_cache(path: str, T: int | None = None) -> dict[str, np.ndarray]:
    """Load a DKDM cache safely (restricted unpickler) and return ``{'total_t', 'total_x_t_1'}`` arrays."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            obj = _CacheUnpickler(f, path).load()
    except CacheError:
        raise
    except FileNotFoundError:
        raise CacheError(f"{path}: cache file not found") from None
    except Exception as exc:  # any unpickling failure of a truncated/corrupt file
        raise CacheError(f"{path}: corrupt or truncated cache file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise CacheError(f"{path}: expected a dict of arrays, found {type(obj).__name__}")
    missing = [k for k in CACHE_KEYS if k not in obj]
    if missing:
        raise CacheError(f"{path}: missing key(s) {missing}; found {sorted(map(str, obj))}")
    total_t, total_x_t_1 = obj["total_t"], obj["total_x_t_1"]
    validate_cache(path, total_t, total_x_t_1, T)
    if CHECKSUM_KEY in obj and obj[CHECKSUM_KEY] != _digest(total_t, total_x_t_1):
        raise CacheError(f"{path}: checksum mismatch; the file changed after it was written (corrupt copy?)")
    return {"total_t": total_t.astype(np.int64, copy=False), "total_x_t_1": total_x_t_1}


def save_cache(path: str, total_t: np.ndarray, total_x_t_1: np.ndarray, checksum: bool = False) -> None:
    """Write a cache in the authors' layout (pickled defaultdict, numpy's own pickling), atomically.

    `checksum` adds a SHA-256 of the arrays under `sha256`, verified by `load_cache` (this project's own
    teacher-state files); the authors' loader reads the two arrays and ignores the extra key.
    """
    path = os.fspath(path)
    total_t = np.ascontiguousarray(np.asarray(total_t), dtype=np.int64)
    total_x_t_1 = np.ascontiguousarray(np.asarray(total_x_t_1), dtype=np.float32)
    validate_cache(path, total_t, total_x_t_1)
    payload = collections.defaultdict(None)
    payload["total_t"] = total_t
    payload["total_x_t_1"] = total_x_t_1
    if checksum:
        payload[CHECKSUM_KEY] = _digest(total_t, total_x_t_1)
    atomic_write(path, lambda f: pickle.dump(payload, f, protocol=4))
