"""Evaluator: metric definitions against closed forms / brute force, the Inception port layout, the CLI."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import softmax as sp_softmax

from evaluations import evaluator, metrics
from evaluations.feature_extractors import get_feature_extractor
from evaluations.inception import InceptionV3FID, load_inception, tf_resize_bilinear

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = """
import numpy as np


class Tiny:
    def features(self, images):
        x = images.astype(np.float64) / 255.0
        grid = x[:, ::4, ::4, 0].reshape(len(x), -1)
        pool = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), grid], 1)
        return {"pool": pool, "spatial": None, "logits": None}


def build(device, weights_path):
    return Tiny()
"""


def test_fid_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_fid_near_singular_covariances_are_stable():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 32)), rng.normal(size=(5, 32)) + 0.3
    mu_a, sig_a = metrics.compute_statistics(a)
    mu_b, sig_b = metrics.compute_statistics(b)
    assert np.linalg.matrix_rank(sig_a) < 32
    fid = metrics.frechet_distance(mu_a, sig_a, mu_b, sig_b)
    assert np.isfinite(fid) and fid > 0
    assert abs(metrics.frechet_distance(mu_a, sig_a, mu_a, sig_a)) < 1e-5
    with pytest.raises(ValueError, match="differ in size"):
        metrics.frechet_distance(mu_a, sig_a, mu_b[:3], sig_b[:3, :3])


def test_inception_score_equals_direct_computation():
    logits = np.random.default_rng(2).normal(size=(10, 7)) * 3
    probs = sp_softmax(logits, axis=1)
    expected = []
    for chunk in (probs[:4], probs[4:8], probs[8:]):
        py = chunk.mean(axis=0)
        expected.append(np.exp(np.mean([np.sum(p * np.log(p / py)) for p in chunk])))
    assert metrics.inception_score(logits, split_size=4) == pytest.approx(np.mean(expected), rel=1e-6)
    assert metrics.inception_score(probs, split_size=4) == pytest.approx(np.mean(expected), rel=1e-6)
    assert metrics.inception_score(np.tile(logits[:1], (6, 1))) == pytest.approx(1.0)


def test_inception_score_is_float32_as_adm():
    """ADM takes float32 softmax outputs and keeps numpy's float32 through the KL, the means and the exp."""
    probs = sp_softmax(np.random.default_rng(5).normal(size=(300, 1008)) * 4, axis=1).astype(np.float32)
    scores = []
    for chunk in (probs[:128], probs[128:256], probs[256:]):
        kl = chunk * (np.log(chunk) - np.log(np.expand_dims(np.mean(chunk, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert scores[0].dtype == np.float32
    assert metrics.inception_score(probs, split_size=128) == float(np.mean(scores))
    in64 = metrics.inception_score(probs.astype(np.float64), split_size=128)
    assert in64 == float(np.mean(scores))  # float64 input is computed in float32 too


def _brute_pr(ref, sample, k):
    d_rr, d_ss, d_rs = (
        cdist(ref, ref, "sqeuclidean"),
        cdist(sample, sample, "sqeuclidean"),
        cdist(ref, sample, "sqeuclidean"),
    )
    r_ref, r_s = np.sort(d_rr, axis=1)[:, k], np.sort(d_ss, axis=1)[:, k]
    precision = np.mean([(d_rs[:, j] <= r_ref).any() for j in range(len(sample))])
    recall = np.mean([(d_rs[i] <= r_s).any() for i in range(len(ref))])
    return precision, recall


@pytest.mark.parametrize("rows,cols", [(10000, 10000), (7, 4), (3, 11)])
def test_precision_recall_equals_brute_force(rows, cols):
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(30, 5)).astype(np.float32)
    sample = (rng.normal(size=(25, 5)) * 1.3 + 0.4).astype(np.float32)
    got = metrics.precision_recall(ref, sample, k=3, row_batch_size=rows, col_batch_size=cols)
    want = _brute_pr(ref.astype(np.float64), sample.astype(np.float64), 3)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_tf_legacy_resize_weights():
    x = torch.tensor([[[[0.0, 10.0]]]]).expand(1, 1, 2, 2).contiguous()
    out = tf_resize_bilinear(x, size=4)
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))


EXPECTED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def test_inception_state_dict_has_fid_weights_layout():
    sd = InceptionV3FID().state_dict()
    for key, shape in EXPECTED_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(k.endswith(".conv.weight") for k in sd) == 94
    assert len(sd) == 94 * 6 + 2
    assert not any(k.startswith("AuxLogits") for k in sd)
    params = sum(
        v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "tracked"))
    )
    assert params == 23_850_960


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(0)
    net = InceptionV3FID()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("w") / "pt_inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_shapes_and_spatial_tap(weights_file):
    with pytest.warns(UserWarning, match="not the published"):
        net = load_inception(weights_file)
    captured = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("o", o))
    images = torch.randint(0, 256, (3, 3, 16, 16)).float()
    with torch.no_grad():
        pool, spatial, logits = net(images)
    assert pool.shape == (3, 2048) and spatial.shape == (3, 2023) and logits.shape == (3, 1008)
    tap = captured["o"][:, :7].permute(0, 2, 3, 1).reshape(3, -1)
    assert torch.equal(spatial, tap)
    assert torch.allclose(logits, pool @ net.fc.weight.t())
    assert pool.std(0).mean() > 0


def test_missing_weights_names_file_hash_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"SHA-256 6726825d\.\.\., from the pytorch-fid"):
        load_inception(tmp_path / "absent.pth")


def test_weights_are_verified_by_hash_not_size(weights_file, monkeypatch, recwarn):
    """A file of any size whose SHA-256 starts with the published prefix is accepted silently."""
    import evaluations.inception as inception

    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", _digest(weights_file)[:8])
    load_inception(weights_file)
    assert not [w for w in recwarn if "not the published" in str(w.message)]
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", "6726825d")
    with pytest.warns(UserWarning, match=r"SHA-256 [0-9a-f]{8}\.\.\., expected 6726825d"):
        load_inception(weights_file)


class _FlagRecorder:
    """A feature network that records whether TF32 was allowed while it ran."""

    def __init__(self):
        self.seen = []

    def features(self, images):
        self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        flat = images.reshape(len(images), -1)[:, :6].astype(np.float64)
        return {"pool": flat, "spatial": None, "logits": None}


def test_features_are_extracted_with_tf32_off(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    images = np.random.default_rng(0).integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    recorder = _FlagRecorder()
    evaluator.evaluate("ref", images, "sample", images[::-1].copy(), recorder, inception_like=False)
    assert recorder.seen == [(False, False), (False, False)]
    assert torch.backends.cudnn.allow_tf32 is True


def _npz(path, arr, **extra):
    np.savez(path, arr, **extra)
    return str(path)


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "tiny_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tiny_plugin:build"


def test_cli_with_plugin_features(tmp_path, plugin, capsys):
    rng = np.random.default_rng(4)
    ref = _npz(tmp_path / "ref.npz", rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8))
    sample = _npz(tmp_path / "sample.npz", rng.integers(0, 128, (20, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "m.json"
    assert evaluator.main([ref, sample, "--features", plugin, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sFID: not available" in text and "Inception Score: not available" in text
    assert "FID: " in text and "Precision: " in text and "Recall: " in text
    result = __import__("json").loads(out.read_text())
    assert result["fid"] > 0 and result["sfid"] is None and result["inception_score"] is None
    assert evaluator.main([ref, ref, "--features", plugin]) == 0
    assert "FID: " in capsys.readouterr().out


def test_precomputed_reference_statistics_are_used(tmp_path):
    feats = {"pool": np.random.default_rng(5).normal(size=(6, 4)), "spatial": None}
    stored = {"mu": np.ones(4), "sigma": np.eye(4), "mu_s": np.zeros(3), "sigma_s": np.eye(3)}
    path = _npz(tmp_path / "ref.npz", np.zeros((6, 8, 8, 3), np.uint8), **stored)
    (mu, sigma), (mu_s, _) = evaluator._statistics(path, feats, use_precomputed=True)
    assert np.array_equal(mu, stored["mu"]) and np.array_equal(mu_s, stored["mu_s"])
    (mu, _), spatial = evaluator._statistics(path, feats, use_precomputed=False)
    assert np.allclose(mu, feats["pool"].mean(0)) and spatial is None


BAD_INPUTS = {
    "float": lambda p: _npz(p, np.zeros((4, 8, 8, 3), np.float32)),
    "nchw": lambda p: _npz(p, np.zeros((4, 3, 8, 8), np.uint8)),
    "gray": lambda p: _npz(p, np.zeros((4, 8, 8, 1), np.uint8)),
    "empty": lambda p: _npz(p, np.zeros((0, 8, 8, 3), np.uint8)),
    "no_arr_0": lambda p: (np.savez(p, images=np.zeros((4, 8, 8, 3), np.uint8)), str(p))[1],
    "truncated": lambda p: (Path(p).write_bytes(_truncated_npz_bytes(p)), str(p))[1],
    "size_mismatch": lambda p: _npz(p, np.zeros((4, 12, 12, 3), np.uint8)),
}


def _truncated_npz_bytes(path):
    np.savez(path, np.random.default_rng(0).integers(0, 255, (8, 8, 8, 3), dtype=np.uint8))
    data = Path(path).read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_sample_input_one_line_error_files_untouched(tmp_path, plugin, capsys, kind):
    ref = _npz(tmp_path / "ref.npz", np.zeros((4, 8, 8, 3), np.uint8))
    bad = BAD_INPUTS[kind](tmp_path / "bad.npz")
    before = {p: _digest(p) for p in (ref, bad)}
    assert evaluator.main([ref, bad, "--features", plugin, "--json", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.npz" in err
    assert before == {p: _digest(p) for p in (ref, bad)}
    assert not (tmp_path / "o.json").exists()


def test_missing_weights_exit_code_and_json_guard(tmp_path, capsys):
    arr = np.zeros((4, 8, 8, 3), np.uint8)
    ref, sample = _npz(tmp_path / "r.npz", arr), _npz(tmp_path / "s.npz", arr)
    assert evaluator.main([ref, sample, "--inception_path", str(tmp_path / "none.pth")]) == 2
    assert "6726825d" in capsys.readouterr().err
    assert evaluator.main([ref, sample, "--json", ref]) == 2
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end_with_random_inception(tmp_path, weights_file):
    rng = np.random.default_rng(6)
    ref = _npz(tmp_path / "ref.npz", rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    sample = _npz(tmp_path / "sample.npz", rng.integers(0, 100, (10, 16, 16, 3), dtype=np.uint8))
    cmd = [sys.executable, str(ROOT / "evaluations" / "evaluator.py"), ref, sample]
    cmd += ["--inception_path", str(weights_file), "--device", "cpu", "--batch_size", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    for key in ("Inception Score", "FID", "sFID", "Precision", "Recall"):
        assert np.isfinite(float(lines[key])), key
    assert float(lines["FID"]) > 0 and float(lines["Inception Score"]) >= 1.0


def test_registry_resolves_digits_and_rejects_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        get_feature_extractor("digits", "cpu", str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match="module.path:factory"):
        get_feature_extractor("nonsense", "cpu")
    with pytest.raises(ValueError, match="cannot import"):
        get_feature_extractor("no_such_module_xyz:build", "cpu")


def test_non_finite_stored_reference_statistics_are_refused(tmp_path):
    """Issue 19: a NaN `mu` in a reference batch printed `FID: nan` and exited 0."""
    images = np.random.default_rng(7).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    mu = np.full(2048, np.nan)
    ref = _npz(tmp_path / "ref.npz", images, mu=mu, sigma=np.eye(2048), mu_s=np.zeros(3), sigma_s=np.eye(3))
    feats = {"pool": np.zeros((12, 2048)), "spatial": None}
    with pytest.raises(evaluator.InputError, match=r"ref\.npz: stored statistics mu hold NaN"):
        evaluator._statistics(ref, feats, use_precomputed=True)


def test_npz_header_claiming_more_than_the_file_holds_is_refused_before_allocating(tmp_path, capsys):
    """Issue 19: an npz whose header claimed 286 GiB died with a MemoryError."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (100_000_000, 32, 32, 3)}
    )
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("arr_0.npy", header.getvalue() + bytes(100))
    ok = _npz(tmp_path / "ok.npz", np.zeros((4, 8, 8, 3), np.uint8))
    assert evaluator.main([ok, str(tmp_path / "huge.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'huge.npz'}: 'arr_0' declares shape (100000000, 32, 32, 3)")
    assert "286 GiB" in err and "\n" not in err


def test_statistics_only_reference_gives_fid_alone(tmp_path, capsys):
    """A pytorch-fid statistics file (mu, sigma; RDD's --fid_cache) as the reference: FID against it, no
    precision/recall (no reference features), and a dimension mismatch named in one line."""
    from datasets.digits import load_digits
    from evaluations import metrics

    images = load_digits("ref")[0][:40]
    sample = _npz(tmp_path / "sample.npz", images)
    extractor = get_feature_extractor("digits", "cpu")
    feats = extractor.features(images)["pool"]
    mu, sigma = np.zeros(feats.shape[1]), np.eye(feats.shape[1]) * 2.0
    stats = tmp_path / "cifar10.train.npz"
    np.savez(stats, mu=mu, sigma=sigma)
    ref_images, sample_images = evaluator.load_batches(str(stats), sample)
    assert ref_images is None
    result = evaluator.evaluate(str(stats), None, sample, sample_images, extractor, inception_like=False)
    expected = metrics.frechet_distance(*metrics.compute_statistics(feats), mu, sigma)
    assert result["fid"] == pytest.approx(expected)
    assert result["precision"] is None and result["recall"] is None and result["sfid"] is None
    assert evaluator.main([str(stats), sample, "--features", "digits", "--device", "cpu"]) == 0
    assert "Precision: n/a" in capsys.readouterr().out
    np.savez(stats, mu=np.zeros(3), sigma=np.eye(3))
    assert evaluator.main([str(stats), sample, "--features", "digits", "--device", "cpu"]) == 2
    assert "stored mu has 3 dims" in capsys.readouterr().err


def test_fid_stats_writes_the_statistics_file_the_evaluator_and_rcfd_eval_read(tmp_path, monkeypatch, capsys):
    """RDD's get_npz.py, as evaluations/fid_stats.py: mu/sigma of a training set's features, written to
    ./stats/<dataset>.train.npz; CIFAR-10 is looked for at their /data/dataset, then ./data."""
    from datasets.digits import load_digits
    from evaluations import fid_stats, metrics

    monkeypatch.chdir(tmp_path)
    images = load_digits("train")[0][:30]
    np.savez(tmp_path / "train.npz", images)
    assert fid_stats.main(["--npz", "train.npz", "--features", "digits"]) == 0
    stored = np.load(tmp_path / "stats" / "cifar10.train.npz")
    mu, sigma = metrics.compute_statistics(get_feature_extractor("digits", "cpu").features(images)["pool"])
    np.testing.assert_allclose(stored["mu"], mu, rtol=1e-6)
    np.testing.assert_allclose(stored["sigma"], sigma, rtol=1e-6, atol=1e-9)
    monkeypatch.setattr(fid_stats, "AUTHORS_ROOT", str(tmp_path / "absent"))
    assert fid_stats.main(["--dataset", "cifar10", "--dry_run"]) == 2
    assert "no cifar-10-batches-py" in capsys.readouterr().err
    batches = tmp_path / "data" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"")
    assert fid_stats.main(["--dataset", "cifar10", "--dry_run"]) == 0
    assert "images from data" in capsys.readouterr().out


def test_an_unreadable_reference_is_one_line_whatever_the_sample(tmp_path, capsys):
    """The statistics-only check reads the reference first: a truncated or non-npz reference beside a good
    sample batch is still one line naming it (it was a BadZipFile traceback)."""
    sample = _npz(tmp_path / "sample.npz", np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "truncated.npz").write_bytes(Path(sample).read_bytes()[:100])
    (tmp_path / "text.npz").write_bytes(b"not a zip")
    for ref in ("truncated.npz", "text.npz"):
        assert evaluator.main([str(tmp_path / ref), sample]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and ref in err and "\n" not in err
