"""Feature networks behind the evaluator, chosen by a spec string.

`inception` (default): the PyTorch FID Inception-v3 port; `tf`: ADM's TensorFlow graph file; `digits`:
the small digits CNN; any `module.path:factory` names a plug-in whose factory takes
(device, weights_path_or_None). Every extractor has
`features(images_uint8_nhwc) -> dict(pool=[N,D], spatial=[N,S] | None, logits=[N,C] | None)`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from evaluations.downloads import CACHE_DIR, fetch_verified
from evaluations.inception import load_inception

SHORT_NAMES = {"digits": "evaluations.digits_features:build_extractor"}
INCEPTION_LIKE = ("inception", "tf")


class FeatureExtractor(Protocol):
    """Anything with a `features` method over uint8 NHWC images."""

    def features(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        """Return dict(pool, spatial, logits); spatial / logits may be None."""
        ...


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """Full float32 convolutions and matmuls while features are extracted: cuDNN's default TF32 moves the
    Inception port's features about 1000x further from the TF graph than the port's own error."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class InceptionExtractor:
    """Pool / spatial / logits of the PyTorch FID Inception port, in batches with a progress bar."""

    def __init__(
        self, device: str | torch.device, weights_path: str | None = None, batch_size: int = 64
    ) -> None:
        self.device = torch.device(device)
        self.net = load_inception(weights_path, self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        """Run the network over uint8 NHWC images; float32 numpy outputs."""
        pools, spatials, logits = [], [], []
        for start in tqdm(range(0, len(images), self.batch_size), desc="inception", leave=False):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
            x = batch.to(self.device).permute(0, 3, 1, 2).float()
            pool, spatial, logit = self.net(x)
            pools.append(pool.cpu().numpy())
            spatials.append(spatial.cpu().numpy())
            logits.append(logit.cpu().numpy())
        return {
            "pool": np.concatenate(pools),
            "spatial": np.concatenate(spatials),
            "logits": np.concatenate(logits),
        }


TF_GRAPH_NAME = "classify_image_graph_def.pb"
TF_GRAPH_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/" + TF_GRAPH_NAME
TF_GRAPH_URL_ENV = "GD_TF_GRAPH_URL"  # a mirror of ADM's download location


def check_tf_graph(path: Path) -> None:
    """A downloaded graph must parse and import with the tensors ADM's evaluator reads (a truncated file or
    an HTML error page does not); ValueError otherwise."""
    try:
        TFGraphExtractor(str(path), batch_size=1).sess.close()
    except ImportError:
        raise
    except Exception as exc:  # protobuf and TensorFlow raise many types for a bad graph
        raise ValueError(f"not ADM's Inception graph: {type(exc).__name__}: {str(exc)[:120]}") from None


class TFGraphExtractor:
    """ADM's TensorFlow graph (`classify_image_graph_def.pb`) run as ADM's evaluator runs it.

    Features: pool_3 and mixed_6/conv[..., :7]. `class_probabilities` is ADM's softmax graph (pool features
    times the graph's `softmax/logits` weights, softmax in float32, 512 rows per run) and
    `pairwise_sq_distances` ADM's distance block (float16, falling back to float32 when a block overflows),
    so Inception Score and precision/recall come out as ADM's. TensorFlow is imported only here
    (`pip install -e .[tf]`).
    """

    SOFTMAX_BATCH = 512

    def __init__(self, graph_path: str, batch_size: int = 64) -> None:
        import tensorflow.compat.v1 as tf

        tf.disable_v2_behavior()
        self.tf = tf
        self.batch_size = batch_size
        graph_def = tf.GraphDef()
        with open(graph_path, "rb") as f:
            graph_def.ParseFromString(f.read())
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.images = tf.placeholder(tf.float32, shape=[None, None, None, 3])
            pool, spatial, matmul = tf.import_graph_def(
                graph_def,
                input_map={"ExpandDims:0": self.images},
                return_elements=["pool_3:0", "mixed_6/conv:0", "softmax/logits/MatMul"],
                name="fid",
            )
            _free_batch_dimension(self.graph, tf)
            self.outputs = [tf.reshape(pool, [-1, 2048]), spatial[..., :7]]
            self.pool_in = tf.placeholder(tf.float32, shape=[None, 2048])
            self.probs = tf.nn.softmax(tf.matmul(self.pool_in, matmul.inputs[1]))
            self.u, self.v = (tf.placeholder(tf.float32, shape=[None, None]) for _ in range(2))
            half = _sq_distance_graph(tf, tf.cast(self.u, tf.float16), tf.cast(self.v, tf.float16))
            self.distances = tf.cond(
                tf.reduce_all(tf.math.is_finite(half)),
                lambda: tf.cast(half, tf.float32),
                lambda: _sq_distance_graph(tf, self.u, self.v),
            )
        config = tf.ConfigProto(allow_soft_placement=True)
        config.gpu_options.allow_growth = True
        self.sess = tf.Session(graph=self.graph, config=config)

    def features(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        """Run the graph over uint8 NHWC images in batches."""
        pools, spatials = [], []
        for start in tqdm(range(0, len(images), self.batch_size), desc="tf-inception", leave=False):
            batch = images[start : start + self.batch_size].astype(np.float32)
            pool, spatial = self.sess.run(self.outputs, {self.images: batch})
            pools.append(pool)
            spatials.append(spatial.reshape(len(batch), -1))
        return {"pool": np.concatenate(pools), "spatial": np.concatenate(spatials), "logits": None}

    def class_probabilities(self, pool: np.ndarray) -> np.ndarray:
        """ADM's softmax over the graph's 1008 classes, from pool features, in float32."""
        parts = [
            self.sess.run(self.probs, {self.pool_in: pool[i : i + self.SOFTMAX_BATCH]})
            for i in range(0, len(pool), self.SOFTMAX_BATCH)
        ]
        return np.concatenate(parts)

    def pairwise_sq_distances(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """ADM's distance block: squared distances computed in float16 (float32 when any overflows)."""
        return self.sess.run(self.distances, {self.u: u, self.v: v})


def _free_batch_dimension(graph, tf) -> None:
    """The 2015 graph is built for one image: let every leading dimension of 1 take any batch size."""
    for op in graph.get_operations():
        for out in op.outputs:
            dims = out.get_shape().as_list() if out.get_shape().dims is not None else None
            if dims and dims[0] == 1:
                out.__dict__["_shape_val"] = tf.TensorShape([None, *dims[1:]])


def _sq_distance_graph(tf, u, v):
    """|u|^2 - 2 u.v + |v|^2 per pair, clipped at zero, in the dtype of u and v."""
    norm_u = tf.reshape(tf.reduce_sum(tf.square(u), 1), [-1, 1])
    norm_v = tf.reshape(tf.reduce_sum(tf.square(v), 1), [1, -1])
    return tf.maximum(norm_u - 2 * tf.matmul(u, v, transpose_b=True) + norm_v, 0.0)


def _load_plugin(spec: str, device: str | torch.device, weights_path: str | None) -> FeatureExtractor:
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise ValueError(f"feature spec {spec!r} is neither a known name nor 'module.path:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"feature spec {spec!r}: cannot import {module_name} ({exc})") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"feature spec {spec!r}: {module_name} has no callable {factory_name}")
    extractor = factory(device, weights_path)
    if not callable(getattr(extractor, "features", None)):
        raise ValueError(f"feature spec {spec!r}: the factory returned an object without features()")
    return extractor


def get_feature_extractor(
    spec: str = "inception",
    device: str | torch.device | None = None,
    weights_path: str | None = None,
    batch_size: int = 64,
    tf_graph: str | None = None,
) -> FeatureExtractor:
    """Build the extractor a spec names: 'inception', 'tf' (needs tf_graph), 'digits' or 'module:factory'."""
    device = device or default_device()
    if spec == "inception":
        return InceptionExtractor(device, weights_path, batch_size)
    if spec == "tf":
        if not tf_graph:
            url = os.environ.get(TF_GRAPH_URL_ENV, TF_GRAPH_URL)
            tf_graph = str(fetch_verified(url, CACHE_DIR / TF_GRAPH_NAME, check_tf_graph, "--tf_graph"))
        return TFGraphExtractor(tf_graph, batch_size)
    return _load_plugin(SHORT_NAMES.get(spec, spec), device, weights_path)
