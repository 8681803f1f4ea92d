"""Training data: an image folder or an `.npz` of uint8 NHWC images, sharded across ranks, resumable.

`load_data` returns an endless iterator of `(batch, cond)` with `batch` NCHW float32 in [-1, 1] and
`cond = {"y": labels}` when class-conditional. The order of every epoch is a pure function of
(seed, shard, epoch), so the iterator's `state_dict()` (epoch and position) is enough for a resumed run
to see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from . import logger

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif")


class DataError(ValueError):
    """A one-line problem with the training data (names the file or value)."""


def list_image_files_recursively(data_dir: str) -> list[str]:
    """All image files under `data_dir` (png/jpg/jpeg/gif, any depth), sorted for a stable order."""
    found = []
    for root, dirs, files in os.walk(data_dir):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Resize so the short side is `image_size` (box-halve, then bicubic), center-crop; uint8 HWC."""
    while min(*pil_image.size) >= 2 * image_size:
        half = tuple(x // 2 for x in pil_image.size)
        pil_image = pil_image.resize(half, resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    new_size = tuple(round(x * scale) for x in pil_image.size)
    pil_image = pil_image.resize(new_size, resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _fit_image(arr: np.ndarray, image_size: int, source: str) -> np.ndarray:
    """Return a uint8 HWC RGB image of exactly `image_size`, cropping/resizing larger ones."""
    h, w = arr.shape[:2]
    if min(h, w) < image_size:
        raise DataError(f"{source}: image is {h}x{w}, smaller than image_size {image_size}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if h == image_size and w == image_size:
        return arr
    return center_crop_arr(Image.fromarray(arr), image_size)


class _FolderSource:
    """Images decoded lazily from files; class label = file name prefix before the first underscore."""

    def __init__(self, data_dir: str, image_size: int, class_cond: bool) -> None:
        files = list_image_files_recursively(data_dir)
        if not files:
            raise DataError(f"{data_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.files = files
        self.image_size = image_size
        self.labels = None
        if class_cond:
            names = [os.path.basename(f).split("_")[0] for f in files]
            index = {name: i for i, name in enumerate(sorted(set(names)))}
            self.labels = np.array([index[n] for n in names], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> np.ndarray:
        path = self.files[i]
        try:
            with Image.open(path) as pil:
                pil.load()
                pil = pil.convert("RGB")
        except OSError as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from None
        return _fit_image(np.asarray(pil), self.image_size, path)


class _NpzSource:
    """Images held in memory from an `.npz` (`arr_0` uint8 NHWC with 1 or 3 channels, optional `arr_1`)."""

    def __init__(self, path: str, image_size: int, class_cond: bool) -> None:
        try:
            with np.load(path) as npz:
                files = npz.files
                images = npz["arr_0"] if "arr_0" in files else None
                labels = npz["arr_1"] if "arr_1" in files else None
        except Exception as exc:  # numpy and zipfile raise many types for truncated or non-npz files
            first = (str(exc).strip().splitlines() or [""])[0]
            raise DataError(f"{path}: cannot read npz ({type(exc).__name__}: {first})") from None
        if images is None:
            raise DataError(f"{path}: no 'arr_0' array (found {files}); expected uint8 NHWC images")
        if len(images) == 0:
            raise DataError(f"{path}: arr_0 holds no images")
        if images.dtype != np.uint8:
            raise DataError(f"{path}: arr_0 has dtype {images.dtype}, expected uint8 images in [0, 255]")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[3] not in (1, 3):
            raise DataError(f"{path}: arr_0 has shape {images.shape}, expected NHWC with 1 or 3 channels")
        if class_cond and labels is None:
            raise DataError(f"{path}: class_cond is set but the npz has no 'arr_1' labels")
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{path}: arr_1 has {len(labels)} labels for {len(images)} images")
        self.path = path
        self.images = images
        self.image_size = image_size
        self.labels = labels.astype(np.int64) if class_cond else None
        _fit_image(images[0], image_size, path)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        return _fit_image(self.images[i], self.image_size, self.path)


class ImageBatchIterator:
    """Endless, shard-aware, resumable batch iterator; drops the incomplete last batch of each epoch."""

    def __init__(
        self,
        source: _FolderSource | _NpzSource,
        *,
        batch_size: int,
        deterministic: bool,
        random_flip: bool,
        seed: int,
        shard: int,
        num_shards: int,
        name: str,
    ) -> None:
        self.source = source
        self.indices = np.arange(shard, len(source), num_shards)
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if batch_size > len(self.indices):
            raise DataError(
                f"{name}: batch_size {batch_size} is larger than this rank's shard of {len(self.indices)} "
                f"images ({len(source)} images over {num_shards} ranks)"
            )
        self.batch_size = batch_size
        self.deterministic = deterministic
        self.random_flip = random_flip
        self.seed = seed
        self.shard = shard
        self.num_shards = num_shards
        self.epoch = 0
        self.position = 0
        self.unreadable: set[int] = set()
        self._order, self._flips = self._epoch_plan(0)

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.shard, epoch])
        n = len(self.indices)
        order = np.arange(n) if self.deterministic else rng.permutation(n)
        flips = rng.random(n) < 0.5 if self.random_flip else np.zeros(n, dtype=bool)
        return order, flips

    def batches_per_epoch(self) -> int:
        """Number of full batches this rank yields per pass over its shard."""
        return len(self.indices) // self.batch_size

    def __iter__(self) -> ImageBatchIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.position + self.batch_size > len(self.indices):
            self.epoch += 1
            self.position = 0
            self._order, self._flips = self._epoch_plan(self.epoch)
        picks = self._order[self.position : self.position + self.batch_size]
        flips = self._flips[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        items = self.indices[picks]
        images = []
        for slot, (pick, flip) in enumerate(zip(picks, flips, strict=True)):
            items[slot], arr = self._readable(int(pick))
            images.append(arr[:, ::-1] if flip else arr)
        batch = np.stack(images).astype(np.float32) / 127.5 - 1.0
        cond = {}
        if self.source.labels is not None:
            cond["y"] = torch.from_numpy(self.source.labels[items])
        return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))), cond

    def _readable(self, pick: int) -> tuple[int, np.ndarray]:
        """(source index, image) for shard position `pick`. An unreadable file is skipped with a warning and
        the next readable one in shard order takes its place: batches, and so resumes, stay deterministic."""
        n = len(self.indices)
        for offset in range(n):
            idx = int(self.indices[(pick + offset) % n])
            try:
                return idx, self.source.image(idx)
            except DataError as exc:
                if idx not in self.unreadable:
                    self.unreadable.add(idx)
                    logger.warn(f"skipping an unreadable image ({len(self.unreadable)} so far): {exc}")
        raise DataError(f"none of the {n} images of this rank's shard can be read")

    def state_dict(self) -> dict:
        """Position in the endless stream (epoch, offset) plus what defines the order, for exact resume."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shard": self.shard,
            "num_shards": self.num_shards,
            "shard_size": len(self.indices),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the shard layout must match or the order would differ. Data that
        changed size since the checkpoint (an unreadable file removed, say) resumes at the same epoch and
        position with a warning: the order from there on cannot be the interrupted run's."""
        current = self.state_dict()
        for key in ("seed", "shard", "num_shards", "batch_size"):
            if state.get(key) != current[key]:
                saved = state.get(key)
                raise DataError(f"data state mismatch: saved {key}={saved}, current {key}={current[key]}")
        if state.get("shard_size") != current["shard_size"]:
            logger.warn(
                f"the data changed since the checkpoint ({state.get('shard_size')} -> "
                f"{current['shard_size']} images in this rank's shard): resuming at the same position, in a "
                "different order"
            )
        self.epoch = int(state["epoch"])
        self.position = min(int(state["position"]), len(self.indices))
        self._order, self._flips = self._epoch_plan(self.epoch)


def load_data(
    *,
    data_dir: str,
    batch_size: int,
    image_size: int,
    class_cond: bool = False,
    deterministic: bool = False,
    random_flip: bool = True,
    seed: int = 0,
    shard: int | None = None,
    num_shards: int | None = None,
) -> ImageBatchIterator:
    """Endless `(NCHW in [-1, 1], {"y": labels}?)` batches from a folder or `.npz`, this rank's shard only."""
    if not data_dir:
        raise DataError("data_dir is empty: pass --data_dir (an image folder or an .npz file)")
    if shard is None or num_shards is None:
        from . import dist_util

        shard, num_shards = dist_util.get_rank(), dist_util.get_world_size()
    if data_dir.endswith(".npz") and os.path.isfile(data_dir):
        source = _NpzSource(data_dir, image_size, class_cond)
    elif os.path.isdir(data_dir):
        source = _FolderSource(data_dir, image_size, class_cond)
    else:
        raise DataError(f"{data_dir}: not an image folder or an .npz file")
    return ImageBatchIterator(
        source,
        batch_size=batch_size,
        deterministic=deterministic,
        random_flip=random_flip,
        seed=seed,
        shard=shard,
        num_shards=num_shards,
        name=data_dir,
    )

