"""`--features tf` gives the ADM evaluator's five lines, on a small TF1 graph with ADM's tensor names.

The graph stands in for `classify_image_graph_def.pb` (which cannot be downloaded here): random weights, the
same input (`ExpandDims:0`, one image, uint8 values as float) and outputs (`pool_3:0` of 2048 features,
`mixed_6/conv:0`, `softmax/logits/MatMul`). The expected lines come from ADM's code path restated in
tests/tf_adm_oracle.py: features in batches of 64, IS from a float32 softmax graph in numpy float32, FID from
mean/cov/sqrtm, and precision/recall from float16 distance blocks (float32 when a block overflows) with k = 3
radii. TensorFlow runs in child processes only: with torch's inductor in the same process it can crash.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ORACLE = str(ROOT / "tests" / "tf_adm_oracle.py")
LINES = ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:")


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _images(n_ref: int, n_sample: int, root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, (n_ref, 32, 32, 3), dtype=np.uint8)
    sample = np.clip(rng.integers(0, 256, (n_sample, 32, 32, 3)) + 8, 0, 255).astype(np.uint8)
    paths = root / f"ref{n_ref}.npz", root / f"sample{n_sample}.npz"
    np.savez(paths[0], ref)
    np.savez(paths[1], sample)
    return paths


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tfgraph") / "classify_image_graph_def.pb"
    _run(ORACLE, "build", str(path))
    return path


def test_tf_backend_prints_adm_lines(graph):
    ref, sample = _images(300, 250, graph.parent)
    out = _run(
        "evaluations/evaluator.py", str(ref), str(sample), "--features", "tf", "--tf_graph", str(graph)
    )
    ours = [line for line in out.splitlines() if line.startswith(LINES)]
    expected = _run(ORACLE, "adm", str(graph), str(ref), str(sample)).splitlines()
    assert len(expected) == 5 and ours == expected
    precision, recall = (float(line.split()[-1]) for line in expected[3:])
    assert 0.1 < precision < 0.95 and 0.1 < recall < 0.95


@pytest.mark.parametrize("scale", [0.25, 1.0])
def test_float32_distances_would_move_precision_and_recall(graph, scale):
    """The float16 blocks are what ADM measures; float32 distances (the PyTorch path) give other P/R. Prints
    the figures docs/EVALUATION.md quotes (`pytest tests/test_evaluator_tf.py -k float32 -s`)."""
    scaled = graph.parent / f"scaled{scale}.pb"
    _run(ORACLE, "build", str(scaled), str(scale))
    ref, sample = _images(1000, 1000, graph.parent)
    gap = json.loads(_run(ORACLE, "gap", str(scaled), str(ref), str(sample)))
    print(
        f"\nfeature norm {gap['norm']:.1f}: precision/recall float16 (ADM) {gap['float16']}, "
        f"float32 {gap['float32']}"
    )
    assert gap["float16"] != gap["float32"]
