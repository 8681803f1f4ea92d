"""The arithmetic of evaluations/metrics.py on small hand-checked cases: the FID fallbacks, the softmax shift,
the Inception Score's zero-probability rule and input checks, and the k-NN manifold boundaries.

test_evaluator.py checks the metrics against reference values; these tests catch what a reference number does
not move (tools/mutants.sh showed which): argument checks at their exact bounds, the eps fallback of the FID
sqrtm, the <= of the manifold membership and dtypes."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from evaluations import metrics


def test_statistics_need_two_rows_and_take_any_width():
    mean, cov = metrics.compute_statistics(np.array([[1.0], [3.0]]))  # N = 2, D = 1: the smallest valid input
    assert mean.tolist() == [2.0] and float(cov) == pytest.approx(2.0)  # unbiased: ((1-2)^2 + (3-2)^2) / 1
    feats = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0], [1.0, 4.0, 1.0], [3.0, 0.0, 5.0]])
    mean, cov = metrics.compute_statistics(feats)
    centred = feats - feats.mean(0)
    np.testing.assert_allclose(cov, centred.T @ centred / 3)  # features in columns, N-1 in the denominator
    for bad in (np.zeros((1, 3)), np.zeros(5)):
        with pytest.raises(ValueError, match=r"shape \[N>=2, D\]"):
            metrics.compute_statistics(bad)


def test_frechet_distance_refuses_statistics_of_different_sizes():
    with pytest.raises(ValueError, match="statistics differ in size"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="statistics differ in size"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(2))


def test_a_non_finite_sqrtm_is_retried_with_eps_on_both_diagonals(monkeypatch):
    calls = []
    real = metrics.linalg.sqrtm

    def sqrtm(m):
        calls.append(np.array(m))
        return np.full_like(m, np.nan) if len(calls) == 1 else real(m)

    monkeypatch.setattr(metrics.linalg, "sqrtm", sqrtm)
    s1, s2 = np.diag([1.0, 2.0, 3.0]), np.diag([2.0, 1.0, 5.0])
    with pytest.warns(UserWarning, match=r"singular covariance product in FID; adding 1e-06"):
        fid = metrics.frechet_distance(np.zeros(3), s1, np.ones(3), s2)
    eye = np.eye(3) * 1e-6
    np.testing.assert_allclose(calls[1], (s1 + eye) @ (s2 + eye), rtol=0, atol=0)
    root = np.sqrt((np.diag(s1) + 1e-6) * (np.diag(s2) + 1e-6))
    expected = 3 + np.trace(s1) + np.trace(s2) - 2 * np.sum(root)
    assert fid == pytest.approx(expected, rel=1e-12)


def test_a_small_imaginary_part_is_dropped_and_a_large_one_refused(monkeypatch):
    base = np.diag([1.0, 4.0]).astype(complex)
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda m: base + 1e-4j * np.eye(2))
    fid = metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
    assert isinstance(fid, float) and fid == pytest.approx(2 + 2 - 2 * 5.0)
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda m: base + 2e-2j * np.eye(2))
    with pytest.raises(metrics.InvalidFIDError, match=r"imaginary component 0\.02 in FID sqrtm"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))


def test_softmax_shifts_each_row_by_its_own_max_in_float32():
    p = metrics.softmax(np.array([[0.0, 1.0], [1000.0, 1001.0]], dtype=np.float64))
    assert p.dtype == np.float32 and np.isfinite(p).all()
    e = math.e
    np.testing.assert_allclose(p, [[1 / (1 + e), e / (1 + e)]] * 2, rtol=1e-6)


def test_rows_are_read_as_probabilities_only_when_non_negative_and_summing_to_one():
    looks = metrics._looks_like_probs
    assert looks(np.array([[0.0, 1.0], [0.5, 0.5]]))  # zeros are probabilities
    assert looks(np.array([[0.25, 0.75 + 5e-5]]))  # within 1e-4 of one
    assert not looks(np.array([[0.5, 1.0]]))  # non-negative logits summing to 1.5
    assert not looks(np.array([[-0.5, 1.5]]))  # sums to one with a negative entry


def test_inception_score_zero_probabilities_contribute_nothing_and_raise_no_warning():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score = metrics.inception_score(probs)
    assert score == pytest.approx(2.0, rel=1e-6)  # exp(KL([1,0] || [0.5,0.5])) = exp(log 2)
    assert metrics.inception_score(probs[:1]) == pytest.approx(1.0)  # a single row is valid: KL 0


def test_inception_score_checks_its_input_and_split():
    for bad in (np.zeros((0, 3)), np.zeros(4)):
        with pytest.raises(ValueError, match=r"non-empty \[N, C\] array"):
            metrics.inception_score(bad)
    with pytest.raises(ValueError, match="split_size must be positive; got 0"):
        metrics.inception_score(np.ones((2, 2)) / 2, split_size=0)
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.inception_score(probs, split_size=1) == pytest.approx(1.0)  # one row per chunk


def test_inception_score_default_chunks_are_5000_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5003, 3)).astype(np.float32) * 3
    assert metrics.inception_score(logits) == metrics.inception_score(logits, split_size=5000)
    assert metrics.inception_score(logits) != metrics.inception_score(logits, split_size=5001)


def test_pairwise_distances_are_float32_and_zero_for_identical_points():
    u = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float64)
    d = metrics.pairwise_sq_distances(u, u)
    assert d.dtype == np.float32
    np.testing.assert_array_equal(np.diag(d), [0.0, 0.0])
    assert d[0, 1] == pytest.approx(8.0)
    assert metrics.pairwise_sq_distances(u.astype(np.float32), u).dtype == np.float32


def test_manifold_needs_more_points_than_k_and_positive_blocks():
    est = metrics.ManifoldEstimator(row_batch_size=1, col_batch_size=1, nhood_sizes=(3,))
    radii = est.manifold_radii(np.arange(4, dtype=np.float32)[:, None])  # 4 points, k = 3: the smallest set
    assert radii.dtype == np.float32 and radii[:, 0].tolist() == [9.0, 4.0, 4.0, 9.0]
    with pytest.raises(ValueError, match="manifold of 3 points needs more than k=3 points"):
        est.manifold_radii(np.arange(3, dtype=np.float32)[:, None])
    for rows, cols in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match=f"batch sizes must be positive; got {rows}, {cols}"):
            metrics.ManifoldEstimator(row_batch_size=rows, col_batch_size=cols)


def test_a_point_exactly_on_a_ball_boundary_is_inside():
    ref = np.array([[0.0], [1.0]], dtype=np.float32)  # k = 1: each reference ball has squared radius 1
    sample = np.array([[-1.0], [5.0]], dtype=np.float32)  # -1 lies on the ball of 0; 5 on none
    est = metrics.ManifoldEstimator(nhood_sizes=(1,))
    precision, recall = est.evaluate_pr(ref, est.manifold_radii(ref), sample, est.manifold_radii(sample))
    # sample radii are 36; ref 0 is at squared distance 1 from -1, ref 1 at 4: both inside its ball
    assert precision.tolist() == [0.5] and recall.tolist() == [1.0]
    far = np.array([[-6.0], [5.0]], dtype=np.float32)  # radii 121: the boundary case for recall
    _, recall = est.evaluate_pr(np.array([[5.0], [-17.0]], dtype=np.float32), np.array([[0.0], [0.0]]),
                                far, est.manifold_radii(far))
    assert recall.tolist() == [1.0]  # -17 is at squared distance 121 from -6: on the boundary, inside


def test_precision_recall_uses_k_3_and_the_distances_it_is_given():
    rng = np.random.default_rng(1)
    ref, sample = rng.normal(size=(40, 4)), rng.normal(size=(40, 4)) + 0.7
    default = metrics.precision_recall(ref, sample)
    assert default == metrics.precision_recall(ref, sample, k=3)
    assert default != metrics.precision_recall(ref, sample, k=1)
    calls = []

    def recorded(u, v):
        calls.append((len(u), len(v)))
        return metrics.pairwise_sq_distances(u, v)

    assert metrics.precision_recall(ref, sample, row_batch_size=16, col_batch_size=16, distances=recorded) \
        == default
    assert calls and max(max(c) for c in calls) == 16  # blocks of the requested size, through `distances`


def test_fid_precision_recall_is_the_three_metrics_of_one_call(monkeypatch):
    rng = np.random.default_rng(2)
    ref, feats = rng.normal(size=(30, 3)), rng.normal(size=(30, 3)) + 0.5
    out = metrics.fid_precision_recall(ref, feats)
    fid = metrics.frechet_distance(*metrics.compute_statistics(feats), *metrics.compute_statistics(ref))
    precision, recall = metrics.precision_recall(ref, feats)
    assert out == {"fid": fid, "precision": precision, "recall": recall}
    assert out["precision"] != out["recall"]  # the order of the sets matters, so a swap would show

    def invalid(*_):
        raise metrics.InvalidFIDError("imaginary component")

    monkeypatch.setattr(metrics, "frechet_distance", invalid)
    assert metrics.fid_precision_recall(ref, feats)["fid"] is None
