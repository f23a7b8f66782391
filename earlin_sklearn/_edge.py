"""The deployable parts: the edge module (prefix + detector head) and the cloud module."""

import copy
from typing import NamedTuple, Union

import numpy as np
import torch
from torch import nn

from ._features import input_dtype, pool_activation
from ._split import check_tensor_payload, split_model


class EdgeOutput(NamedTuple):
    """What the edge module returns for a batch of inputs."""

    is_id: torch.Tensor
    """(N,) bool: True = in-distribution, send ``payload`` to the cloud."""
    score: torch.Tensor
    """(N,) float64: the detector's ``score_samples`` (higher = more ID)."""
    payload: Union[torch.Tensor, tuple]
    """The activation that crosses the cut, or a tuple of them (skip connections)."""


class DetectorHead(nn.Module):
    """A fitted :class:`DistanceDetector` (and channel selection) as torch tensors.

    Computes in float64 with the same operations as the scikit-learn steps
    (whitening, then distances from differences), so scores agree with
    ``score_samples`` to about 1e-12 and decisions agree. Needs no
    scikit-learn at run time.

    Parameters
    ----------
    channels : array-like of int
        Indices of the kept pooled features.
    centroids : array-like of shape (n_centroids, n_channels)
    whitening : array-like of shape (n_channels, n_channels) or None
        Mahalanobis whitening ``W`` (``W @ W.T`` = precision); None for the
        Euclidean and cosine metrics.
    metric : {"mahalanobis", "euclidean", "cosine"}
    offset : float
        Threshold on the score.
    n_pooled : int, default=None
        Number of pooled features before selection (default: the largest
        selected index + 1).
    """

    def __init__(self, channels, centroids, whitening, metric, offset, n_pooled=None):
        super().__init__()
        self.metric = metric
        channels = np.asarray(channels)
        centroids = np.asarray(centroids, dtype=np.float64)
        w = np.eye(centroids.shape[1]) if whitening is None else np.asarray(whitening, dtype=np.float64)
        if metric == "cosine":
            centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
            w = np.eye(centroids.shape[1])  # select only: normalization comes after
        else:
            centroids = centroids @ w  # whitened (Mahalanobis) as min_centroid_distance does
        # channel selection folded into one matrix: pooled @ projection == pooled[:, channels] @ w
        n_pooled = int(channels.max()) + 1 if n_pooled is None else int(n_pooled)
        projection = np.zeros((n_pooled, w.shape[1]))
        projection[channels] = w
        self.register_buffer("projection", torch.as_tensor(projection))
        self.register_buffer("centroids", torch.as_tensor(centroids))
        self.register_buffer("offset", torch.tensor(float(offset), dtype=torch.float64))

    @classmethod
    def from_steps(cls, select, distance):
        """Build from a fitted :class:`ChannelSelector` and :class:`DistanceDetector`."""
        return cls(select.channels_, distance.centroids_, distance.whitening_, distance.metric, distance.offset_,
                   n_pooled=select.n_features_in_)

    def forward(self, pooled):
        x = pooled.to(torch.float64) @ self.projection
        if self.metric == "cosine":
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = (x[:, None, :] - self.centroids[None, :, :]).square().sum(dim=2)
        if self.metric == "cosine":
            return -0.5 * d.min(dim=1).values  # 1 - cos for unit vectors
        return -d.min(dim=1).values.sqrt()


class EdgeModule(nn.Module):
    """The edge part: the backbone up to the detection layer, plus the detector.

    ``edge(x)`` returns :class:`EdgeOutput` ``(is_id, score, payload)``.

    Parameters
    ----------
    prefix : torch.fx.GraphModule
        From :func:`split_model`: returns ``(activation, *crossing)``.
    head : DetectorHead
    pooling : {"mean", "max", "meanstd"}
    """

    def __init__(self, prefix, head, pooling):
        super().__init__()
        self.prefix = prefix
        self.head = head
        self.pooling = pooling

    def forward(self, x):
        activation, *crossing = self.prefix(x)
        score = self.head(pool_activation(activation, self.pooling))
        payload = crossing[0] if len(crossing) == 1 else tuple(crossing)
        return EdgeOutput(score >= self.head.offset, score, payload)


class CloudModule(nn.Module):
    """The cloud part: the rest of the backbone.

    ``cloud(payload)`` (a tensor or a tuple of tensors, as in
    :attr:`EdgeOutput.payload`) or ``cloud(*tensors)`` returns the original
    model's output.
    """

    def __init__(self, suffix):
        super().__init__()
        self.suffix = suffix

    def forward(self, *payload):
        if len(payload) == 1 and isinstance(payload[0], (tuple, list)):
            payload = tuple(payload[0])
        return self.suffix(*payload)


def build_split(detector):
    """``(edge, cloud)`` modules from a fitted :class:`ShallowFeatureOODDetector`.

    Both are on the CPU, in evaluation mode, with gradients off; the
    detector itself is not changed.
    """
    features = detector.pipeline_["features"]
    module = copy.deepcopy(features.module_).cpu().eval()
    prefix, suffix = split_model(module, features.layer)
    head = DetectorHead.from_steps(detector.pipeline_["select"], detector.pipeline_["distance"])
    edge = EdgeModule(prefix, head, features.pooling).eval().requires_grad_(False)
    cloud = CloudModule(suffix).eval().requires_grad_(False)
    example = torch.zeros((1, *features.input_shape_), dtype=input_dtype(module))
    check_tensor_payload(prefix, example)
    return edge, cloud
