"""The deployable parts: the edge module (prefix + detector head) and the cloud module."""

import copy
from typing import NamedTuple, Union

import numpy as np
import torch
from torch import nn

from ._features import pool_activation
from ._torch import input_dtype
from ._split import check_tensor_payload, split_model


# PowerTransformer's test for a zero (or two) lambda, where Yeo-Johnson takes its log branch
_LAMBDA_EPS = float(np.spacing(1.0))


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
    gaussianize : sklearn.preprocessing.PowerTransformer, default=None
        A fitted Yeo-Johnson transform applied to the pooled features before
        selection (its lambdas and standardization become tensors).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> edge, _ = det.export_split()
    >>> head = edge.head  # a DetectorHead: the fitted steps as tensors
    >>> pooled = edge.pooled(edge.taps_and_crossing(X[:4])[0])
    >>> bool(torch.allclose(head(pooled), torch.as_tensor(det.score_samples(X[:4])), atol=1e-6))
    True
    """

    def __init__(self, channels, centroids, whitening, metric, offset, n_pooled=None, gaussianize=None):
        super().__init__()
        self.metric = metric
        self.gaussianize = gaussianize is not None
        if self.gaussianize:
            lambdas = np.asarray(gaussianize.lambdas_, dtype=np.float64)
            # PowerTransformer keeps its standardization in a private StandardScaler: read it (an
            # AttributeError if scikit-learn renames it, never a silently unstandardized edge)
            scaler = gaussianize._scaler if gaussianize.standardize else None
            mean = np.zeros_like(lambdas) if scaler is None else scaler.mean_
            scale = np.ones_like(lambdas) if scaler is None else scaler.scale_
            self.register_buffer("yj_lambda", torch.as_tensor(lambdas))
            self.register_buffer("yj_mean", torch.as_tensor(np.asarray(mean, dtype=np.float64)))
            self.register_buffer("yj_scale", torch.as_tensor(np.asarray(scale, dtype=np.float64)))
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
    def from_steps(cls, select, distance, gaussianize=None):
        """Build from a fitted :class:`ChannelSelector`, :class:`DistanceDetector` (and power transform).

        The threshold is the distance step's ``offset_``, the one that every path reads.
        """
        n_pooled = gaussianize.n_features_in_ if gaussianize is not None else select.n_features_in_
        return cls(select.channels_, distance.centroids_, distance.whitening_, distance.metric, distance.offset_,
                   n_pooled=n_pooled, gaussianize=gaussianize)

    def _yeo_johnson(self, x):
        # sklearn's PowerTransformer formula, both branches computed on clamped inputs (no NaN from the unused one)
        lam, eps = self.yj_lambda, _LAMBDA_EPS
        pos, neg = x.clamp_min(0), (-x).clamp_min(0)
        lam_pos = torch.where(lam.abs() < eps, torch.ones_like(lam), lam)
        out_pos = torch.where(lam.abs() < eps, torch.log1p(pos), ((pos + 1).pow(lam_pos) - 1) / lam_pos)
        two = 2.0 - lam
        two_safe = torch.where(two.abs() < eps, torch.ones_like(two), two)
        out_neg = torch.where(two.abs() < eps, -torch.log1p(neg), -((neg + 1).pow(two_safe) - 1) / two_safe)
        return (torch.where(x >= 0, out_pos, out_neg) - self.yj_mean) / self.yj_scale

    def forward(self, pooled):
        x = pooled.to(torch.float64)
        if self.gaussianize:
            x = self._yeo_johnson(x)
        x = x @ self.projection
        if self.metric == "cosine":
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = (x[:, None, :] - self.centroids[None, :, :]).square().sum(dim=2)
        if self.metric == "cosine":
            score = -0.5 * d.min(dim=1).values  # 1 - cos for unit vectors
        else:
            score = -d.min(dim=1).values.sqrt()
        # an input whose features overflow scores as far from ID as possible (never NaN, never accepted)
        return score.masked_fill(torch.isnan(score), float("-inf"))


class EdgeModule(nn.Module):
    """The edge part: the backbone up to the detection layer, plus the detector.

    ``edge(x)`` returns :class:`EdgeOutput` ``(is_id, score, payload)``.

    Parameters
    ----------
    prefix : torch.fx.GraphModule
        From :func:`split_model`: returns ``(activation, *extra, *crossing)``.
    head : DetectorHead
    pooling : {"mean", "max", "meanstd"}
    n_extra : int, default=0
        Number of extra taps the prefix returns after the activation.
    layout : {"channels", "tokens", "tokens+cls", "auto"}, default="channels"
        Axes of the taps (see ``pool_activation``).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> edge, cloud = det.export_split()
    >>> out = edge(X[:4])  # EdgeOutput(is_id, score, payload)
    >>> out.is_id.tolist() == (det.predict(X[:4].numpy()) == 1).tolist()
    True
    """

    def __init__(self, prefix, head, pooling, n_extra=0, layout="channels"):
        super().__init__()
        self.prefix = prefix
        self.head = head
        self.pooling = pooling
        self.n_extra = int(n_extra)
        self.layout = layout

    def taps_and_crossing(self, x):
        """``([*extra taps, activation], crossing)``: the detector's inputs and the payload tensors."""
        activation, *rest = self.prefix(x)
        return [*rest[: self.n_extra], activation], rest[self.n_extra :]

    def pooled(self, taps):
        """The detector's pooled features, in :class:`BackboneFeatures`' order."""
        return torch.cat([pool_activation(a, self.pooling, self.layout) for a in taps], dim=1)

    def forward(self, x):
        taps, crossing = self.taps_and_crossing(x)
        score = self.head(self.pooled(taps))
        payload = crossing[0] if len(crossing) == 1 else tuple(crossing)
        return EdgeOutput(score >= self.head.offset, score, payload)


class CloudModule(nn.Module):
    """The cloud part: the rest of the backbone.

    ``cloud(payload)`` (a tensor or a tuple of tensors, as in
    :attr:`EdgeOutput.payload`) or ``cloud(*tensors)`` returns the original
    model's output.

    Parameters
    ----------
    suffix : torch.fx.GraphModule
        From :func:`split_model`: takes the tensors that cross the cut.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> edge, cloud = det.export_split()
    >>> logits = cloud(edge(X[:4]).payload)  # the rest of the model on what the edge sends
    >>> bool(torch.allclose(logits, det.backbone(X[:4]), atol=1e-5))
    True
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
    extra = features.extra_layers_
    example = torch.zeros((1, *features.input_shape_), dtype=input_dtype(module))
    prefix, suffix = split_model(module, features.layer, extra, example=example)
    gaussianize = detector.pipeline_["gaussianize"]
    head = DetectorHead.from_steps(detector.pipeline_["select"], detector.pipeline_["distance"],
                                   gaussianize=None if gaussianize == "passthrough" else gaussianize)
    edge = EdgeModule(prefix, head, features.pooling, n_extra=len(extra), layout=features.layout)
    edge.layer, edge.extra_layers = features.layer, list(extra)
    edge = edge.eval().requires_grad_(False)
    cloud = CloudModule(suffix).eval().requires_grad_(False)
    check_tensor_payload(prefix, example)
    return edge, cloud
