"""Evaluate a sample batch against a reference batch: Inception Score, FID, sFID, Precision, Recall.

    python evaluations/evaluator.py REF.npz SAMPLE.npz [--features inception] [--inception_path FILE]

Prints the ADM evaluator's lines. Inputs are read only; nothing is cached next to them. Bad input exits with
code 2 and a one-line message naming the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from evaluations import metrics  # noqa: E402
from evaluations.feature_extractors import (  # noqa: E402
    INCEPTION_LIKE,
    FeatureExtractor,
    get_feature_extractor,
    tf32_disabled,
)
from evaluations.npz_io import (  # noqa: E402
    InputError,
    atomic_write,
    holds_statistics_only,
    read_image_npz,
    read_npz_stats,
)


def _statistics(
    path: str, feats: dict[str, np.ndarray | None], use_precomputed: bool
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """(pool stats, spatial stats or None): ADM's stored mu/sigma/mu_s/sigma_s when allowed, else computed."""
    stored = read_npz_stats(path) if use_precomputed else None
    if stored is not None:
        bad = [k for k, v in stored.items() if v is not None and not np.isfinite(v).all()]
        if bad:
            raise InputError(f"{path}: stored statistics {', '.join(bad)} hold NaN or inf values")
        if feats is not None and stored["mu"].shape[-1] != feats["pool"].shape[1]:
            raise InputError(
                f"{path}: stored mu has {stored['mu'].shape[-1]} dims, features have {feats['pool'].shape[1]}"
            )
        spatial = (stored["mu_s"], stored["sigma_s"]) if stored["mu_s"] is not None else None
        return (stored["mu"], stored["sigma"]), spatial
    pool = metrics.compute_statistics(feats["pool"])
    spatial = metrics.compute_statistics(feats["spatial"]) if feats.get("spatial") is not None else None
    return pool, spatial


def load_batches(ref_path: str, sample_path: str) -> tuple[np.ndarray | None, np.ndarray]:
    """Read and validate both image batches; they must share the image size. A reference holding only
    statistics (a pytorch-fid `mu`/`sigma` file, e.g. RDD's --fid_cache) gives None: FID alone."""
    sample_images = read_image_npz(sample_path)
    if holds_statistics_only(ref_path):
        return None, sample_images
    ref_images = read_image_npz(ref_path)
    if ref_images.shape[1:] != sample_images.shape[1:]:
        raise InputError(
            f"{sample_path}: image size {sample_images.shape[1:3]} differs from "
            f"{ref_path} {ref_images.shape[1:3]}"
        )
    return ref_images, sample_images


def evaluate(
    ref_path: str,
    ref_images: np.ndarray | None,
    sample_path: str,
    sample_images: np.ndarray,
    extractor: FeatureExtractor,
    inception_like: bool = True,
    class_histogram: bool = False,
) -> dict[str, Any]:
    """All metrics of the sample batch against the reference batch with one feature network (None: n/a).

    Features are extracted with TF32 off. An extractor may bring ADM's own arithmetic for the Inception Score
    (`class_probabilities`) and for precision/recall (`pairwise_sq_distances`); the TF graph backend does.
    """
    ref_feats = None
    if ref_images is not None:
        print(f"computing reference batch activations {ref_path}...")
        with tf32_disabled():
            ref_feats = extractor.features(ref_images)
    ref_stats, ref_spatial = _statistics(ref_path, ref_feats, inception_like or ref_feats is None)
    print(f"computing sample batch activations {sample_path}...")
    with tf32_disabled():
        sample_feats = extractor.features(sample_images)
    sample_stats, sample_spatial = _statistics(sample_path, sample_feats, inception_like)
    if ref_feats is None and ref_stats[0].shape[-1] != sample_stats[0].shape[-1]:
        raise InputError(f"{ref_path}: stored mu has {ref_stats[0].shape[-1]} dims, the sample features "
                         f"{sample_stats[0].shape[-1]}")
    print("Computing evaluations...")
    result: dict[str, Any] = {
        "inception_score": _inception_score(extractor, sample_feats) if inception_like else None,
        "fid": metrics.frechet_distance(*sample_stats, *ref_stats),
        "sfid": (
            metrics.frechet_distance(*sample_spatial, *ref_spatial)
            if ref_spatial is not None and sample_spatial is not None
            else None
        ),
    }
    if class_histogram:
        result["class_histogram"] = _class_histogram(sample_feats, sample_path)
    if ref_feats is None:  # statistics-only reference: no reference features to compare manifolds with
        result["precision"] = result["recall"] = None
        return result
    distances = getattr(extractor, "pairwise_sq_distances", metrics.pairwise_sq_distances)
    result["precision"], result["recall"] = metrics.precision_recall(
        ref_feats["pool"], sample_feats["pool"], distances=distances
    )
    return result


def _class_histogram(feats: dict[str, np.ndarray | None], path: str) -> list[int]:
    """Samples per class by the feature network's argmax (a digits student drawing too many 8s shows here)."""
    logits = feats.get("logits")
    if logits is None:
        raise InputError(f"{path}: --class_histogram needs a feature network with class logits (e.g. digits)")
    return np.bincount(logits.argmax(axis=1), minlength=logits.shape[1]).tolist()


def _inception_score(extractor: FeatureExtractor, feats: dict[str, np.ndarray | None]) -> float | None:
    """IS from the extractor's own class probabilities when it has them, else from its logits."""
    probs = getattr(extractor, "class_probabilities", None)
    if probs is not None:
        return metrics.inception_score(probs(feats["pool"]), from_logits=False)
    logits = feats.get("logits")
    return metrics.inception_score(logits, from_logits=True) if logits is not None else None


def _print_results(result: dict[str, Any], spec: str) -> None:
    for key, label in (("inception_score", "Inception Score:"), ("fid", "FID:"), ("sfid", "sFID:")):
        if result[key] is None:
            print(f"{label[:-1]}: not available for the '{spec}' feature network")
        else:
            print(label, result[key])
    for key in ("precision", "recall"):
        value = result[key]
        print(f"{key.capitalize()}:", "n/a (statistics-only reference)" if value is None else value)
    if "class_histogram" in result:
        print("Class histogram:", " ".join(map(str, result["class_histogram"])))


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments (ADM's two positionals plus the feature-network options)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ref_batch", help="reference batch npz (arr_0 uint8 NHWC; optional mu/sigma/mu_s/sigma_s)")
    p.add_argument("sample_batch", help="sample batch npz (arr_0 uint8 NHWC)")
    p.add_argument("--features", default="inception", help="inception | tf | digits | module.path:factory")
    p.add_argument("--inception_path", default=None, help="FID Inception weights (pt_inception-2015-12-05)")
    p.add_argument("--weights_path", default=None, help="weights for a plug-in feature network")
    p.add_argument("--tf_graph", default=None, help="classify_image_graph_def.pb for --features tf")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write the metrics as JSON to this file")
    p.add_argument("--class_histogram", action="store_true",
                   help="also count the samples per class (argmax of the feature network's logits)")
    p.add_argument("--dry_run", action="store_true", help="read and check both batches, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch_size must be positive, got {args.batch_size}")
        if args.json:
            inputs = {os.path.realpath(args.ref_batch), os.path.realpath(args.sample_batch)}
            if os.path.realpath(args.json) in inputs:
                raise InputError(f"--json {args.json} would overwrite an input file")
        ref_images, sample_images = load_batches(args.ref_batch, args.sample_batch)
        if args.dry_run:
            refs = "statistics" if ref_images is None else f"{len(ref_images)} reference images"
            print(f"dry run: {refs} and {len(sample_images)} sample images read; no features computed")
            return 0
        weights = args.inception_path if args.features == "inception" else args.weights_path
        extractor = get_feature_extractor(args.features, args.device, weights, args.batch_size, args.tf_graph)
        inception_like = args.features in INCEPTION_LIKE
        result = evaluate(
            args.ref_batch, ref_images, args.sample_batch, sample_images, extractor, inception_like,
            args.class_histogram,
        )
    except (InputError, FileNotFoundError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    _print_results(result, args.features)
    if args.json:
        payload = {"ref_batch": args.ref_batch, "sample_batch": args.sample_batch, "features": args.features}
        payload.update(result)
        atomic_write(args.json, lambda f: f.write((json.dumps(payload, indent=2) + "\n").encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
