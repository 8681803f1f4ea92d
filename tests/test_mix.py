"""Data tools: real/synthetic mixing, the npz builders on tiny files in their real formats, the PNG dump."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import mix
from datasets.download_cifar10 import dump_pngs
from evaluations import celeba64_npz, cifar_npz, imagenet32_npz


def _save(path, arr):
    np.savez(path, arr)
    return str(path)


@pytest.fixture
def real_and_syn(tmp_path):
    real = np.full((40, 8, 8, 3), 200, np.uint8)
    real[:, 0, 0, 0] = np.arange(40)
    syn = np.full((50, 8, 8, 3), 10, np.uint8)
    syn[:, 0, 0, 0] = np.arange(50)
    return real, syn, _save(tmp_path / "real.npz", real), _save(tmp_path / "syn.npz", syn)


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.2, 0.33, 1.0])
def test_mix_keeps_exact_real_count_and_is_deterministic(real_and_syn, ratio):
    real, syn, _, _ = real_and_syn
    out = mix.mix_arrays(real, syn, ratio, seed=3)
    n_real = int((out[:, 1, 1, 0] == 200).sum())
    assert len(out) == 40 and n_real == round(ratio * 40)
    assert len(np.unique(out[:, 0, 0, 0][out[:, 1, 1, 0] == 200])) == n_real
    assert np.array_equal(out, mix.mix_arrays(real, syn, ratio, seed=3))
    if 0 < ratio < 1:
        assert not np.array_equal(out, mix.mix_arrays(real, syn, ratio, seed=4))


def test_mix_cli_npz_and_png_and_errors(real_and_syn, tmp_path, capsys):
    real, _, real_path, syn_path = real_and_syn
    assert (
        mix.main(
            [
                "--dataset",
                real_path,
                "--synthetic",
                syn_path,
                "--ratio",
                "0.1",
                "--output_dir",
                str(tmp_path / "o"),
                "--format",
                "npz",
            ]
        )
        == 0
    )
    arr = np.load(tmp_path / "o" / "mixed.npz")["arr_0"]
    assert arr.shape == real.shape and (arr[:, 1, 1, 0] == 200).sum() == 4
    png_dir = tmp_path / "p"
    args = ["--dataset", real_path, "--synthetic", syn_path, "--ratio", "0.5", "--output_dir", str(png_dir)]
    assert mix.main(args) == 0
    assert sorted(p.name for p in png_dir.glob("*.png")) == [f"{i:06d}.png" for i in range(40)]
    few = _save(tmp_path / "few.npz", np.zeros((5, 8, 8, 3), np.uint8))
    assert (
        mix.main(
            ["--dataset", real_path, "--synthetic", few, "--ratio", "0.5", "--output_dir", str(tmp_path)]
        )
        == 2
    )
    assert "synthetic set has 5" in capsys.readouterr().err
    other = _save(tmp_path / "other.npz", np.zeros((60, 16, 16, 3), np.uint8))
    assert (
        mix.main(
            ["--dataset", real_path, "--synthetic", other, "--ratio", "0.5", "--output_dir", str(tmp_path)]
        )
        == 2
    )
    assert "differ in size" in capsys.readouterr().err


def test_mix_picks_the_images_the_authors_script_picks(real_and_syn, tmp_path):
    """Their datasets/mix.py: np.random.seed(0), np.random.choice over the real then the synthetic index
    lists without replacement, real picks then synthetic picks, written as 000000.png, ... in that order."""
    real, syn, real_path, syn_path = real_and_syn
    np.random.seed(0)
    n_real = round(len(real) * 0.3)
    chosen_real = np.random.choice(list(range(len(real))), n_real, replace=False)
    chosen_syn = np.random.choice(list(range(len(syn))), len(real) - n_real, replace=False)
    theirs = np.concatenate([real[chosen_real], syn[chosen_syn]])
    out = tmp_path / "cifar10_baseline_0.3"
    assert mix.main(["--dataset", real_path, "--synthetic", syn_path, "--ratio", "0.3", "--output_dir",
                     str(out)]) == 0
    ours = np.stack([np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(len(real))])
    assert np.array_equal(ours, theirs)


def _cifar_rows(n, offset):
    rng = np.random.default_rng(offset)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def test_cifar_npz_from_pickles_and_png_dump(tmp_path):
    folder = tmp_path / "raw" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = [_cifar_rows(3, i) for i in range(5)]
    for i, r in enumerate(rows, start=1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": r, b"labels": [0, 1, 2]}, protocol=2))
    out = tmp_path / "c.npz"
    assert cifar_npz.main(["--data_dir", str(tmp_path / "raw"), "--output", str(out)]) == 0
    arr = np.load(out)["arr_0"]
    assert arr.shape == (15, 32, 32, 3) and arr.dtype == np.uint8
    assert arr[4, 2, 5, 1] == rows[1][1, 1024 + 2 * 32 + 5]

    class Fake:
        classes = ["airplane", "truck"]

        def __len__(self):
            return 12

        def __getitem__(self, i):
            return Image.fromarray(arr[i]), i % 2

    dump = tmp_path / "dump"
    assert dump_pngs(Fake(), dump / "cifar_train") == 12
    assert (dump / "cifar_train" / "car_00011.png").is_file()  # the authors' class names and 5 digits
    assert cifar_npz.main(["--data_dir", str(dump), "--output", str(out)]) == 0
    listed = [int(n.split("_")[1][:5]) for n in os.listdir(dump / "cifar_train")]
    assert np.array_equal(np.load(out)["arr_0"], arr[listed])
    assert cifar_npz.main(["--data_dir", str(tmp_path / "nothing"), "--output", str(out)]) == 2


def test_imagenet32_npz_orders_batches_numerically(tmp_path):
    rows = {i: _cifar_rows(2, 10 + i) for i in range(1, 11)}
    for i, r in rows.items():
        payload = {"data": r, "labels": [1, 2], "mean": r.mean(0)}
        if i % 2:
            (tmp_path / f"train_data_batch_{i}").write_bytes(pickle.dumps(payload))
        else:
            np.savez(tmp_path / f"train_data_batch_{i}.npz", **payload)
    out = tmp_path / "i.npz"
    assert imagenet32_npz.main(["--data_dir", str(tmp_path), "--output", str(out)]) == 0
    arr = np.load(out)["arr_0"]
    assert arr.shape == (20, 32, 32, 3)
    expected = np.dstack([rows[10][:, :1024], rows[10][:, 1024:2048], rows[10][:, 2048:]]).reshape(
        -1, 32, 32, 3
    )
    assert np.array_equal(arr[18:], expected)
    (tmp_path / "train_data_batch_3").unlink()
    assert imagenet32_npz.main(["--data_dir", str(tmp_path), "--output", str(out)]) == 2


def test_celeba64_resize_matches_area_mean_on_exact_halving_and_cli(tmp_path):
    img = np.random.default_rng(7).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    half = celeba64_npz.resize_linear(img, 3, 4)
    block_mean = img.astype(float).reshape(4, 2, 3, 2, 3).mean(axis=(1, 3))
    assert np.array_equal(half, np.floor(block_mean + 0.5).astype(np.uint8))
    folder = Path(tmp_path) / "img_align_celeba"
    folder.mkdir()
    faces = np.random.default_rng(8).integers(0, 256, (3, 218, 178, 3), dtype=np.uint8)
    for i, face in enumerate(faces):
        Image.fromarray(face).save(folder / f"{i + 1:06d}.png")
    out = tmp_path / "celeba.npz"
    assert celeba64_npz.main(["--data_dir", str(tmp_path), "--output", str(out)]) == 0
    arr = np.load(out)["arr_0"]
    assert arr.shape == (3, 64, 64, 3)
    order = [int(n[:6]) - 1 for n in os.listdir(folder)]  # the authors' script reads in listing order
    assert np.array_equal(arr[order.index(1)], celeba64_npz.resize_linear(faces[1], 64, 64))
    assert celeba64_npz.main(["--data_dir", str(tmp_path), "--output", str(out), "--center_crop", "140"]) == 0
    cropped = celeba64_npz.resize_linear(faces[2][39:179, 19:159], 64, 64)
    assert np.array_equal(np.load(out)["arr_0"][order.index(2)], cropped)


def test_npz_tools_with_no_arguments_read_the_authors_folders(tmp_path, monkeypatch):
    """As the authors' scripts: ./cifar -> cifar10_train.npz, ./img_align_celeba -> celeba64_train.npz,
    ./ImageNet64/train_data_batch_<i>.npz -> ImageNet32_train_all.npz, each folder in listing order."""
    monkeypatch.chdir(tmp_path)
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    Path("cifar").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(f"cifar/{('plane', 'car')[i % 2]}_{i:05d}.png")
    assert cifar_npz.main([]) == 0
    listed = [int(n.split("_")[1][:5]) for n in os.listdir("cifar")]
    assert np.array_equal(np.load("cifar10_train.npz")["arr_0"], images[listed])
    Path("img_align_celeba").mkdir()
    Image.fromarray(np.zeros((218, 178, 3), np.uint8)).save("img_align_celeba/000001.jpg")
    assert celeba64_npz.main([]) == 0 and np.load("celeba64_train.npz")["arr_0"].shape == (1, 64, 64, 3)
    Path("ImageNet64").mkdir()
    for i in range(1, 11):
        np.savez(f"ImageNet64/train_data_batch_{i}.npz", data=_cifar_rows(1, i), labels=[i])
    assert imagenet32_npz.main([]) == 0
    assert np.load("ImageNet32_train_all.npz")["arr_0"].shape == (10, 32, 32, 3)
