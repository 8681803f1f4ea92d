"""TensorFlow side of tests/test_evaluator_tf.py, run in its own process (TensorFlow and torch's inductor
in one process can crash): builds the stand-in graph, prints ADM's five lines, or measures the P/R gap.

    python tests/tf_adm_oracle.py build GRAPH [SCALE]
    python tests/tf_adm_oracle.py adm GRAPH REF.npz SAMPLE.npz
    python tests/tf_adm_oracle.py gap GRAPH REF.npz SAMPLE.npz
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tensorflow.compat.v1 as tf  # the tf extra (pip install -e .[tf]); tools/install.sh installs it
from scipy import linalg

tf.disable_v2_behavior()

LINES = ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:")


def _build_graph(path: Path, seed: int = 0, size: int = 24, scale: float = 1.0) -> None:
    """A tiny Inception stand-in; its pool features have norms near 100 * scale."""
    rng = np.random.default_rng(seed)

    def const(scale: float, *shape: int):
        return tf.constant(rng.normal(0, scale, shape).astype(np.float32))

    graph = tf.Graph()
    with graph.as_default():
        decoded = tf.placeholder(tf.float32, [None, None, 3], name="DecodeJpeg")
        x = tf.image.resize_bilinear(tf.expand_dims(decoded, 0, name="ExpandDims"), [size, size])
        x = tf.nn.relu(tf.nn.conv2d((x - 128.0) / 128.0, const(0.5, 3, 3, 3, 16), [1, 2, 2, 1], "SAME"))
        with tf.name_scope("mixed_6"):
            spatial = tf.nn.relu(tf.nn.conv2d(x, const(0.3, 3, 3, 16, 8), [1, 1, 1, 1], "SAME"), name="conv")
        wide = tf.nn.relu(tf.nn.conv2d(spatial, const(scale, 1, 1, 8, 2048), [1, 1, 1, 1], "SAME"))
        pool = tf.nn.avg_pool(wide, [1, size // 2, size // 2, 1], [1, 1, 1, 1], "VALID", name="pool_3")
        with tf.name_scope("softmax/logits"):
            tf.matmul(tf.reshape(pool, [1, 2048]), const(0.05, 2048, 1008), name="MatMul")
    path.write_bytes(graph.as_graph_def().SerializeToString())


def _adm_lines(graph_path: Path, ref: np.ndarray, sample: np.ndarray) -> list[str]:
    """ADM's evaluator, step by step, in a session of its own."""
    graph_def = tf.GraphDef()
    graph_def.ParseFromString(graph_path.read_bytes())
    with tf.Graph().as_default() as graph, tf.Session(graph=graph) as sess:
        images = tf.placeholder(tf.float32, [None, None, None, 3])
        pool, spatial = tf.import_graph_def(
            graph_def, input_map={"ExpandDims:0": images}, return_elements=["pool_3:0", "mixed_6/conv:0"]
        )
        for op in graph.get_operations():
            for out in op.outputs:
                dims = out.get_shape().as_list() if out.get_shape().dims is not None else None
                if dims and dims[0] == 1:
                    out.__dict__["_shape_val"] = tf.TensorShape([None, *dims[1:]])
        spatial = spatial[..., :7]
        acts_in = tf.placeholder(tf.float32, [None, 2048])
        (matmul,) = tf.import_graph_def(graph_def, return_elements=["softmax/logits/MatMul"], name="sm")
        softmax = tf.nn.softmax(tf.matmul(acts_in, matmul.inputs[1]))
        u, v = tf.placeholder(tf.float32, [None, None]), tf.placeholder(tf.float32, [None, None])

        def sq(a, b):
            na, nb = tf.reshape(tf.reduce_sum(tf.square(a), 1), [-1, 1]), tf.reduce_sum(tf.square(b), 1)
            return tf.maximum(na - 2 * tf.matmul(a, b, False, True) + tf.reshape(nb, [1, -1]), 0.0)

        half = sq(tf.cast(u, tf.float16), tf.cast(v, tf.float16))
        dist = tf.cond(
            tf.reduce_all(tf.math.is_finite(half)), lambda: tf.cast(half, tf.float32), lambda: sq(u, v)
        )

        def activations(batch):
            runs = [
                sess.run([pool, spatial], {images: batch[i : i + 64].astype(np.float32)})
                for i in range(0, len(batch), 64)
            ]
            return [np.concatenate([r[j].reshape(len(r[j]), -1) for r in runs]) for j in (0, 1)]

        (ref_pool, ref_sp), (s_pool, s_sp) = activations(ref), activations(sample)
        preds = np.concatenate(
            [sess.run(softmax, {acts_in: s_pool[i : i + 512]}) for i in range(0, len(s_pool), 512)]
        )
        kl = preds * (np.log(preds) - np.log(np.expand_dims(np.mean(preds, 0), 0)))
        inception = float(np.mean([np.exp(np.mean(np.sum(kl, 1)))]))

        def fid(a, b):
            mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
            covmean = linalg.sqrtm(s1.dot(s2)).real
            return (mu1 - mu2).dot(mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)

        def radii(feats):
            return np.partition(sess.run(dist, {u: feats, v: feats}), [0, 1, 2, 3], axis=1)[:, 3]

        d_rs = sess.run(dist, {u: ref_pool, v: s_pool})
        precision = float(np.mean(np.any(d_rs <= radii(ref_pool)[:, None], axis=0).astype(np.float64)))
        recall = float(np.mean(np.any(d_rs <= radii(s_pool)[None, :], axis=1).astype(np.float64)))
    values = (inception, fid(s_pool, ref_pool), fid(s_sp, ref_sp), precision, recall)
    return [f"{label} {value}" for label, value in zip(LINES, values, strict=True)]


def _gap(graph_path: Path, ref: np.ndarray, sample: np.ndarray) -> dict:
    """Precision/recall with ADM's float16 distance blocks and with float32 ones (the PyTorch path's)."""
    from evaluations import metrics
    from evaluations.feature_extractors import TFGraphExtractor

    extractor = TFGraphExtractor(str(graph_path))
    ref_pool, sample_pool = extractor.features(ref)["pool"], extractor.features(sample)["pool"]
    return {
        "norm": float(np.linalg.norm(ref_pool, axis=1).mean()),
        "float16": metrics.precision_recall(ref_pool, sample_pool, distances=extractor.pairwise_sq_distances),
        "float32": metrics.precision_recall(ref_pool, sample_pool),
    }


def main(argv: list[str]) -> None:
    """Dispatch on the first argument (build, adm, gap)."""
    command, graph = argv[0], Path(argv[1])
    if command == "build":
        _build_graph(graph, scale=float(argv[2]) if len(argv) > 2 else 1.0)
        return
    ref, sample = (np.load(path)["arr_0"] for path in argv[2:4])
    if command == "adm":
        print("\n".join(_adm_lines(graph, ref, sample)))
    elif command == "gap":
        print(json.dumps(_gap(graph, ref, sample)))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
