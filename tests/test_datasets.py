"""Data loading: folder and npz sources, sharding, exact resume, one-line errors."""

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.image_datasets import DataError, load_data

ONE = {"shard": 0, "num_shards": 1}


def _write_folder(root, n=12, size=16, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        where = root / "sub" if i % 2 else root
        Image.fromarray(arr).save(where / f"{classes[i % len(classes)]}_{i:03d}.png")
    return root


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def test_folder_batches_labels_and_range(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    loader = load_data(data_dir=str(root), batch_size=4, image_size=16, class_cond=True, **ONE)
    batch, cond = next(loader)
    assert batch.shape == (4, 3, 16, 16) and str(batch.dtype) == "torch.float32"
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert set(cond["y"].tolist()) <= {0, 1}


def test_folder_labels_follow_filename_prefix(tmp_path):
    root = _write_folder(tmp_path / "imgs", n=6)
    loader = load_data(
        data_dir=str(root), batch_size=6, image_size=16, class_cond=True, deterministic=True,
        random_flip=False, shard=0, num_shards=1,
    )
    files = loader.source.files
    _, cond = next(loader)
    expected = [0 if "cat_" in f.rsplit("/", 1)[-1] else 1 for f in files]
    assert cond["y"].tolist() == expected


def test_larger_images_are_center_cropped(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    arr = np.zeros((40, 64, 3), dtype=np.uint8)
    arr[:, 24:40] = 255  # a bright central column survives the center crop
    Image.fromarray(arr).save(root / "a_0.png")
    loader = load_data(data_dir=str(root), batch_size=1, image_size=16, random_flip=False, **ONE)
    batch, _ = next(loader)
    assert batch.shape == (1, 3, 16, 16)
    assert batch[0, :, :, 8].mean() > 0.9 and batch[0, :, :, 0].mean() < -0.9


def test_npz_grey_expanded_and_labels(tmp_path):
    path = tmp_path / "d.npz"
    imgs = np.full((10, 16, 16), 255, dtype=np.uint8)
    np.savez(path, imgs, np.arange(10) % 3)
    loader = load_data(data_dir=str(path), batch_size=5, image_size=16, class_cond=True, **ONE)
    batch, cond = next(loader)
    assert batch.shape == (5, 3, 16, 16) and float(batch.min()) == 1.0
    assert cond["y"].max() <= 2


def test_shards_are_disjoint(tmp_path):
    path = tmp_path / "d.npz"
    imgs = np.arange(8, dtype=np.uint8)[:, None, None, None] * np.ones((1, 16, 16, 3), dtype=np.uint8)
    np.savez(path, imgs)
    seen = []
    for rank in range(2):
        loader = load_data(
            data_dir=str(path), batch_size=4, image_size=16, deterministic=True, random_flip=False,
            shard=rank, num_shards=2,
        )
        batch, _ = next(loader)
        seen.append({round(float((b[0, 0, 0] + 1) * 127.5)) for b in batch})
    assert seen[0] == {0, 2, 4, 6} and seen[1] == {1, 3, 5, 7}


def test_resume_reproduces_the_stream(tmp_path):
    root = _write_folder(tmp_path / "imgs", n=10)
    kwargs = dict(data_dir=str(root), batch_size=3, image_size=16, seed=7, shard=0, num_shards=1)
    ref = load_data(**kwargs)
    expected = _take(ref, 8)  # crosses several epochs (3 batches per epoch)
    first = load_data(**kwargs)
    _take(first, 5)
    state = first.state_dict()
    resumed = load_data(**kwargs)
    resumed.load_state_dict(state)
    for (a, _), (b, _) in zip(expected[5:], _take(resumed, 3), strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(expected[0][0].numpy(), expected[3][0].numpy())


def test_resume_rejects_other_layout(tmp_path):
    root = _write_folder(tmp_path / "imgs", n=10)
    state = load_data(data_dir=str(root), batch_size=3, image_size=16, shard=0, num_shards=1).state_dict()
    other = load_data(data_dir=str(root), batch_size=2, image_size=16, shard=0, num_shards=1)
    with pytest.raises(DataError, match="batch_size"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"images": np.zeros((4, 16, 16, 3), np.uint8)}, "no 'arr_0'"),
        ({"arr_0": np.zeros((4, 16, 16, 3), np.float32)}, "dtype float32"),
        ({"arr_0": np.zeros((4, 3, 16, 16), np.uint8)}, "NHWC"),
        ({"arr_0": np.zeros((4, 8, 8, 3), np.uint8)}, "smaller than image_size 16"),
        ({"arr_0": np.zeros((2, 16, 16, 3), np.uint8)}, "larger than this rank's shard"),
    ],
)
def test_npz_errors_are_one_line(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match) as info:
        load_data(data_dir=str(path), batch_size=4, image_size=16, shard=0, num_shards=1)
    assert "\n" not in str(info.value) and "bad.npz" in str(info.value)


def test_empty_folder_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images found"):
        load_data(data_dir=str(tmp_path / "empty"), batch_size=1, image_size=16, shard=0, num_shards=1)


def test_unreadable_image_is_skipped_with_a_warning_and_resume_stays_exact(tmp_path, capsys):
    """Issue 19: one unreadable image ended an image_train run for good (exact resume replayed the same
    batch). It is now skipped, logged once, and the next readable image in shard order takes its place."""
    from guided_diffusion import logger

    root = _write_folder(tmp_path / "imgs", n=10)
    broken = sorted(root.rglob("*.png"))[4]
    broken.write_bytes(b"not a png")
    kwargs = dict(data_dir=str(root), batch_size=3, image_size=16, seed=7, class_cond=True, **ONE)
    logger.configure(str(tmp_path / "log"), format_strs=["log"])
    try:
        ref = load_data(**kwargs)
        expected = _take(ref, 8)  # every image is drawn, the broken one included
        assert ref.unreadable and len(ref.unreadable) == 1
        first = load_data(**kwargs)
        _take(first, 5)
        resumed = load_data(**kwargs)
        resumed.load_state_dict(first.state_dict())
        for (a, ya), (b, yb) in zip(expected[5:], _take(resumed, 3), strict=True):
            assert np.array_equal(a.numpy(), b.numpy()) and np.array_equal(ya["y"], yb["y"])
    finally:
        logger.reset()
    lines = [ln for ln in (tmp_path / "log" / "log.txt").read_text().splitlines() if "skipping an" in ln]
    assert 1 <= len(lines) <= 3  # at most once per loader, although the reference one drew it in 2+ epochs
    assert all(str(broken) in line and "(1 so far)" in line for line in lines)


def test_resume_after_a_file_was_removed_continues_with_a_warning(tmp_path):
    """Issue 19: after the user removed an unreadable file, the data-state check refused every resume."""
    from guided_diffusion import logger

    root = _write_folder(tmp_path / "imgs", n=10)
    kwargs = dict(data_dir=str(root), batch_size=3, image_size=16, seed=7, **ONE)
    first = load_data(**kwargs)
    _take(first, 2)
    state = first.state_dict()
    sorted(root.rglob("*.png"))[4].unlink()
    logger.configure(str(tmp_path / "log"), format_strs=["log"])
    try:
        resumed = load_data(**kwargs)
        resumed.load_state_dict(state)
        assert (resumed.epoch, resumed.position) == (state["epoch"], state["position"])
        assert len(_take(resumed, 4)) == 4
    finally:
        logger.reset()
    log = (tmp_path / "log" / "log.txt").read_text()
    assert "the data changed since the checkpoint (10 -> 9 images" in log


def test_no_readable_image_is_an_error(tmp_path):
    root = _write_folder(tmp_path / "imgs", n=4)
    for path in root.rglob("*.png"):
        path.write_bytes(b"broken")
    with pytest.raises(DataError, match="none of the 4 images"):
        next(load_data(data_dir=str(root), batch_size=2, image_size=16, **ONE))
