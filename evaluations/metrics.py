"""Sample-quality metrics on feature arrays: FID / sFID, Inception Score, improved Precision and Recall.

Pure numpy/scipy. The definitions follow the ADM evaluator (openai/guided-diffusion
`evaluations/evaluator.py`) that DDPM-IP, DKDM and TCCD report: the same covariance estimator, the same
sqrtm fallback for a near-singular product, IS over `split_size` chunks,
and k-NN manifolds with squared distances.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import linalg


class InvalidFIDError(ValueError):
    """The matrix square root in the Frechet distance kept a large imaginary part."""


def compute_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of features [N, D], as the ADM evaluator computes them."""
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"statistics need features of shape [N>=2, D]; got {feats.shape}")
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    When sqrtm of the product is not finite, eps*I is added to both covariances; a small imaginary part
    (diagonal within 1e-3 of zero) is dropped, a larger one raises InvalidFIDError.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in size: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"singular covariance product in FID; adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise InvalidFIDError(f"imaginary component {np.max(np.abs(covmean.imag))} in FID sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (the precision ADM's graph computes it in), shifted by the row max."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _looks_like_probs(x: np.ndarray) -> bool:
    return bool(np.all(x >= 0) and np.allclose(x.sum(axis=1), 1.0, atol=1e-4))


def inception_score(
    logits_or_probs: np.ndarray, split_size: int = 5000, from_logits: bool | None = None
) -> float:
    """Inception Score: mean over consecutive chunks of `split_size` rows of exp(E[KL(p(y|x) || p(y))]).

    Computed in float32 throughout, as the ADM evaluator does (its softmax is a float32 graph op and the
    KL, means and exp are numpy float32); a class probability of exactly 0 contributes 0 rather than NaN.
    `from_logits=None` treats rows that are non-negative and sum to one as probabilities, else as logits.
    """
    x = np.asarray(logits_or_probs)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"inception_score needs a non-empty [N, C] array; got {x.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be positive; got {split_size}")
    if from_logits is None:
        from_logits = not _looks_like_probs(x)
    preds = softmax(x) if from_logits else x.astype(np.float32, copy=False)
    scores = []
    for start in range(0, len(preds), split_size):
        part = preds[start : start + split_size]
        marginal = np.expand_dims(np.mean(part, 0), 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), np.float32(0))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


DistanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def pairwise_sq_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [len(u), len(v)] as |u|^2 - 2 u.v + |v|^2, clipped at zero (float32)."""
    u = np.asarray(u, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    norm_u = np.sum(u * u, axis=1)[:, None]
    norm_v = np.sum(v * v, axis=1)[None, :]
    return np.maximum(norm_u - 2.0 * (u @ v.T) + norm_v, 0.0)


class ManifoldEstimator:
    """k-NN hypersphere manifolds of feature sets (Kynkaenniemi et al. 2019), computed in row/column blocks.

    Radii are squared distances to the k-th nearest neighbour (the point itself counts as the 0-th).
    `distances(u, v)` gives a float32 block of squared distances: float32 arithmetic by default; ADM's
    TensorFlow backend passes its float16 block (`TFGraphExtractor.pairwise_sq_distances`).
    """

    def __init__(
        self,
        row_batch_size: int = 10000,
        col_batch_size: int = 10000,
        nhood_sizes: Sequence[int] = (3,),
        distances: DistanceFn = pairwise_sq_distances,
    ) -> None:
        if row_batch_size < 1 or col_batch_size < 1:
            raise ValueError(f"batch sizes must be positive; got {row_batch_size}, {col_batch_size}")
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = list(nhood_sizes)
        self.distances = distances

    def _distance_rows(self, rows: np.ndarray, feats: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), len(feats)), dtype=np.float32)
        for begin in range(0, len(feats), self.col_batch_size):
            end = min(begin + self.col_batch_size, len(feats))
            out[:, begin:end] = self.distances(rows, feats[begin:end])
        return out

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        """Radii [N, len(nhood_sizes)]: squared distance of each point to its k-th neighbour in the set."""
        num = len(features)
        kmax = max(self.nhood_sizes)
        if num <= kmax:
            raise ValueError(f"manifold of {num} points needs more than k={kmax} points")
        radii = np.zeros((num, len(self.nhood_sizes)), dtype=np.float32)
        kth = np.arange(kmax + 1)
        for begin in range(0, num, self.row_batch_size):
            end = min(begin + self.row_batch_size, num)
            dist = self._distance_rows(features[begin:end], features)
            radii[begin:end] = np.partition(dist, kth, axis=1)[:, self.nhood_sizes]
        return radii

    def evaluate_pr(
        self, features_1: np.ndarray, radii_1: np.ndarray, features_2: np.ndarray, radii_2: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) per neighbourhood size, with set 1 the reference and set 2 the samples.

        Precision is the fraction of set-2 points inside some set-1 hypersphere; recall the converse.
        """
        status_1 = np.zeros((len(features_1), radii_2.shape[1]), dtype=bool)
        status_2 = np.zeros((len(features_2), radii_1.shape[1]), dtype=bool)
        for b1 in range(0, len(features_1), self.row_batch_size):
            e1 = min(b1 + self.row_batch_size, len(features_1))
            for b2 in range(0, len(features_2), self.col_batch_size):
                e2 = min(b2 + self.col_batch_size, len(features_2))
                dist = self.distances(features_1[b1:e1], features_2[b2:e2])[..., None]
                status_1[b1:e1] |= np.any(dist <= radii_2[None, b2:e2], axis=1)
                status_2[b2:e2] |= np.any(dist <= radii_1[b1:e1, None], axis=0)
        return status_2.mean(axis=0, dtype=np.float64), status_1.mean(axis=0, dtype=np.float64)


def precision_recall(
    ref_feats: np.ndarray,
    sample_feats: np.ndarray,
    k: int = 3,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    distances: DistanceFn = pairwise_sq_distances,
) -> tuple[float, float]:
    """Improved precision and recall of samples against references with k-NN manifolds (ADM's defaults)."""
    est = ManifoldEstimator(
        row_batch_size=row_batch_size, col_batch_size=col_batch_size, nhood_sizes=(k,), distances=distances
    )
    radii_ref = est.manifold_radii(ref_feats)
    radii_sample = est.manifold_radii(sample_feats)
    precision, recall = est.evaluate_pr(ref_feats, radii_ref, sample_feats, radii_sample)
    return float(precision[0]), float(recall[0])


def fid_precision_recall(ref_feats: np.ndarray, feats: np.ndarray) -> dict[str, float | None]:
    """FID (None when its sqrtm keeps a large imaginary part), precision and recall of sample features
    against reference features: the evaluator's numbers for one feature network, in one call."""
    try:
        fid: float | None = frechet_distance(*compute_statistics(feats), *compute_statistics(ref_feats))
    except InvalidFIDError:
        fid = None
    precision, recall = precision_recall(ref_feats, feats)
    return {"fid": fid, "precision": precision, "recall": recall}
