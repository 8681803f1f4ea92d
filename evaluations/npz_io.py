"""Reading and writing the image batches the evaluator and the dataset builders exchange.

An image batch is an `.npz` whose `arr_0` is uint8 [N, H, W, 3] (NHWC); ADM reference batches may also
carry `mu`, `sigma`, `mu_s`, `sigma_s`. Writes are atomic; dataset pickles load through a restricted
unpickler that only rebuilds numpy arrays and plain containers.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from guided_diffusion.infra.atomic_io import atomic_write

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class InputError(ValueError):
    """A user-supplied file or value is unusable; the message is one line naming it."""


def save_npz_atomic(path: str | os.PathLike, *arrays: np.ndarray, **named: np.ndarray) -> None:
    """np.savez (positional arrays become arr_0, arr_1, ...) written atomically."""
    atomic_write(path, lambda f: np.savez(f, *arrays, **named))


def write_images_npz_cli(output: str | os.PathLike, load: Callable[[], np.ndarray], name: str) -> int:
    """Shared tail of the dataset-builder CLIs: validate `load()`'s images (errors name `name`), save.

    Returns 0 after writing `output`, or 2 with a one-line message on stderr when the input is unusable.
    """
    try:
        images = check_images(load(), name)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_npz_atomic(output, images)
    print(f"{images.shape} images saved to {output}")
    return 0


def check_images(arr: Any, name: str) -> np.ndarray:
    """Validate a uint8 NHWC RGB batch; `name` (usually the file) goes into the one-line error."""
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    if arr.ndim != 4:
        raise InputError(f"{name}: expected images of shape [N, H, W, 3], got shape {arr.shape}")
    if arr.shape[-1] != 3:
        hint = " (looks like NCHW; transpose to NHWC)" if arr.shape[1] == 3 else ""
        raise InputError(f"{name}: expected 3 channels last [N, H, W, 3], got shape {arr.shape}{hint}")
    if arr.dtype != np.uint8:
        raise InputError(f"{name}: expected dtype uint8 (values 0..255), got {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise InputError(f"{name}: the image array is empty (shape {arr.shape})")
    return arr


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__})") from exc


def read_image_npz(path: str | os.PathLike, key: str = "arr_0") -> np.ndarray:
    """Load and validate the uint8 NHWC image array `key` of an npz; bad or truncated files: InputError."""
    path = Path(path)
    with _open_npz(path) as data:
        if key not in data.files:
            raise InputError(f"{path}: no '{key}' array (found {sorted(data.files)})")
        _check_declared_size(path, key)
        try:
            arr = data[key]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise InputError(f"{path}: '{key}' cannot be read, the file may be truncated ({exc})") from exc
    return check_images(arr, str(path))


def _check_declared_size(path: Path, key: str) -> None:
    """Refuse an array whose header declares more bytes than its zip member holds, before numpy allocates
    them (a corrupt header once claimed 286 GiB and ended in a MemoryError)."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{key}.npy")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = {
                    (1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0
                }.get(version)
                if read_header is None:
                    return
                shape, _, dtype = read_header(member)
                declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                available = info.file_size - member.tell()
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError):
        return  # not a plain .npy member: numpy's own reader reports the problem
    if not dtype.hasobject and declared > available:
        raise InputError(
            f"{path}: '{key}' declares shape {tuple(shape)} {dtype} ({declared / 2**30:.3g} GiB) but the "
            f"file holds {available} bytes for it; the header is corrupt"
        )


def holds_statistics_only(path: str | os.PathLike) -> bool:
    """True for an npz with `mu` and no `arr_0` images (a pytorch-fid statistics file); an unreadable file is
    an InputError naming it."""
    with _open_npz(Path(path)) as data:
        return "arr_0" not in data.files and "mu" in data.files


def read_npz_stats(path: str | os.PathLike) -> dict[str, np.ndarray | None] | None:
    """Precomputed statistics when the npz has `mu`, else None: ADM's mu, sigma, mu_s, sigma_s, or a
    pytorch-fid statistics file's mu and sigma alone (mu_s and sigma_s then None)."""
    path = Path(path)
    with _open_npz(path) as data:
        if "mu" not in data.files:
            return None
        if "sigma" not in data.files or ("mu_s" in data.files) != ("sigma_s" in data.files):
            raise InputError(f"{path}: has 'mu' but lacks {[k for k in STAT_KEYS if k not in data.files]}")
        return {k: np.asarray(data[k], dtype=np.float64) if k in data.files else None for k in STAT_KEYS}


def _reconstruct_fn() -> Callable:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_fn,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_fn,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("_codecs", "encode"): lambda: codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler limited to numpy arrays, dtypes and builtin containers (dataset batch files)."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the whitelisted globals; anything else is refused."""
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return _ALLOWED_GLOBALS[(module, name)]()


def load_array_pickle(path: str | os.PathLike) -> dict:
    """Load a dataset batch pickle (CIFAR-10 / downsampled ImageNet); only numpy arrays and containers.

    Keys are returned as str even when the file (a Python 2 pickle) stores bytes.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a dataset batch pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
