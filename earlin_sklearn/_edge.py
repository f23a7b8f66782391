"""The deployable parts: the edge module (prefix + detector head) and the cloud module."""

import copy
import math
from typing import NamedTuple, Union

import numpy as np
import torch
from torch import nn

from ._features import pooled_parts
from ._torch import input_dtype
from ._split import check_tensor_payload, split_model


class EdgeOutput(NamedTuple):
    """What the edge module returns for a batch of inputs."""

    is_id: torch.Tensor
    """(N,) bool: True = in-distribution, send ``payload`` to the cloud."""
    score: torch.Tensor
    """(N,) float64: the detector's ``score_samples`` (higher = more ID)."""
    payload: Union[torch.Tensor, tuple]
    """The activation that crosses the cut, or a tuple of them (skip connections)."""


# Yeo-Johnson exponents closer than this to 0 (or 2) are moved to it, where PowerTransformer takes its
# log branch (below 2.2e-16): the head has one formula for every feature. The transform then moves by
# at most about 1e-8 * log1p(|x|)**2 / 2.
MIN_EXPONENT = 1e-8


def _away_from_zero(v, eps):
    return np.where(np.abs(v) < eps, np.where(v < 0, -eps, eps), v)


class DetectorHead(nn.Module):
    """A fitted :class:`DistanceDetector` (with its power transform and channel selection) as a few tensor operations.

    Everything that does not depend on the input is computed once, here. At
    run time the Yeo-Johnson transform of every pooled feature ``b`` is one
    power of each side of zero, ``(1 + relu(+-b)) ** e`` (``e`` = lambda, or
    2 - lambda below zero), in float64 and in PowerTransformer's order of
    operations; the standardized features are then selected and whitened by
    one float32 matrix product, and the distances to all class centroids
    come from one broadcast difference: about fifteen operations whatever
    the number of features and classes. Scores agree with ``score_samples``
    to about 3e-7 (relative; float64 throughout for a float64 backbone) and
    decisions agree. Needs no scikit-learn at run time.

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
        selection (its lambdas and standardization are folded in).
    input_order : array-like of int, default=None
        ``input_order[j]`` is the pooled feature (in :class:`BackboneFeatures`'
        order) that column ``j`` of the head's input holds; None: that order
        itself. :class:`EdgeModule` hands the head its taps' features
        grouped by kind (all means, then all standard deviations).

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

    def __init__(self, channels, centroids, whitening, metric, offset, n_pooled=None, gaussianize=None,
                 input_order=None):
        super().__init__()
        self.metric = metric
        self.gaussianize = gaussianize is not None
        channels = np.asarray(channels)
        centroids = centroids_in = np.asarray(centroids, dtype=np.float64)
        w = np.eye(centroids.shape[1]) if whitening is None else np.asarray(whitening, dtype=np.float64)
        if metric == "cosine":
            centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
            w = np.eye(centroids.shape[1])  # select only: normalization comes after
        else:
            centroids = centroids @ w  # whitened (Mahalanobis) as min_centroid_distance does
        # channel selection as one matrix: pooled @ projection == pooled[:, channels] @ w
        n_pooled = int(channels.max()) + 1 if n_pooled is None else int(n_pooled)
        projection = np.zeros((n_pooled, w.shape[1]))
        projection[channels] = w
        order = np.arange(n_pooled) if input_order is None else np.asarray(input_order, dtype=np.intp)
        if sorted(order.tolist()) != list(range(n_pooled)):
            raise ValueError(f"input_order must be a permutation of the {n_pooled} pooled features.")
        if self.gaussianize:
            lam = _away_from_zero(np.asarray(gaussianize.lambdas_, dtype=np.float64), MIN_EXPONENT)
            lam = 2.0 - _away_from_zero(2.0 - lam, MIN_EXPONENT)
            # PowerTransformer keeps its standardization in a private StandardScaler: read it (an
            # AttributeError if scikit-learn renames it, never a silently unstandardized edge)
            scaler = gaussianize._scaler if gaussianize.standardize else None
            mean = np.zeros_like(lam) if scaler is None else np.asarray(scaler.mean_, dtype=np.float64)
            scale = np.ones_like(lam) if scaler is None else np.asarray(scaler.scale_, dtype=np.float64)
            lam, mean, scale = lam[order], mean[order], scale[order]
            # yeo_johnson(b) = ((1 + relu(b)) ** lam - 1) / lam - ((1 + relu(-b)) ** (2 - lam) - 1) / (2 - lam): one
            # power of each side of zero (the other side is 1 ** e - 1 = 0), in PowerTransformer's order of operations
            # one row per side: 1 + side * shift, where shifted() moves every input feature by `shift` for free
            self.register_buffer("one", torch.ones((2, lam.size), dtype=torch.float64))
            self.register_buffer("side", torch.as_tensor(np.stack([np.ones_like(lam), -np.ones_like(lam)])))
            self.register_buffer("exponent", torch.as_tensor(np.stack([lam, 2.0 - lam])))
            self.register_buffer("signed_exponent", torch.as_tensor(np.stack([lam, lam - 2.0])))
            self.register_buffer("mean", torch.as_tensor(mean))
            self.register_buffer("scale", torch.as_tensor(scale))
        reference = np.zeros(n_pooled)
        if not self.gaussianize and metric != "cosine":
            # raw features: measured from the centroids' mean, so that float32 distances subtract no large numbers
            reference[channels] = centroids_in.mean(axis=0)
        # float32 from here: the features are standardized (or centred), so the whitening and the distances keep
        # about 3e-7 relative; XNNPACK and MLAS run float32 matrix products, not float64 ones
        self.register_buffer("reference", torch.as_tensor(reference[order], dtype=torch.float32))
        self.register_buffer("projection", torch.as_tensor(projection[order], dtype=torch.float32))
        self.register_buffer("centroids", torch.as_tensor(centroids - reference @ projection, dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(float(offset), dtype=torch.float64))

    @classmethod
    def from_steps(cls, select, distance, gaussianize=None, input_order=None):
        """Build from a fitted :class:`ChannelSelector`, :class:`DistanceDetector` (and power transform).

        The threshold is the distance step's ``offset_``, the one that every path reads.
        """
        n_pooled = gaussianize.n_features_in_ if gaussianize is not None else select.n_features_in_
        return cls(select.channels_, distance.centroids_, distance.whitening_, distance.metric, distance.offset_,
                   n_pooled=n_pooled, gaussianize=gaussianize, input_order=input_order)

    @property
    def shift_buffer(self):
        """The buffer that :meth:`shifted` changes: ``"one"`` with the Yeo-Johnson transform, else ``"reference"``."""
        return "one" if self.gaussianize else "reference"

    def shifted(self, shift):
        """A copy that scores ``pooled + shift`` for input ``pooled``, at no extra operation.

        ``shift`` (one value per input feature, in the head's input order)
        corrects a systematic bias of the features, such as an int8 prefix's
        (see ``earlin_sklearn._device_formats.int8_edge``). It is folded
        into the buffers the first operation reads: ``one`` (``1 + side *
        shift``) with the Yeo-Johnson transform, ``reference`` without it.
        """
        head = copy.deepcopy(self)
        shift = torch.as_tensor(np.asarray(shift, dtype=np.float64)).reshape(-1)
        if shift.numel() != self.reference.numel():
            raise ValueError(f"shift has {shift.numel()} values; the head takes {self.reference.numel()} features.")
        with torch.no_grad():
            if self.gaussianize:
                head.one.copy_(self.one + self.side * shift.to(self.one.dtype))
            else:
                head.reference.copy_(self.reference - shift.to(self.reference.dtype))
        return head

    def forward(self, pooled):
        if self.gaussianize:
            # 1 + relu(+-b) for both sides of zero, in float64 (a float32 input is promoted here)
            sides = torch.addcmul(self.one, pooled[:, None, :], self.side).clamp_min(1.0)
            u = (((sides.pow(self.exponent) - 1.0) / self.signed_exponent).sum(dim=1) - self.mean) / self.scale
            u = u.to(self.projection.dtype)
        else:
            u = pooled.to(self.projection.dtype) - self.reference
        z = u @ self.projection  # selected and whitened
        if self.metric == "cosine":
            z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-12)
        diff = z[:, None, :] - self.centroids
        d2 = (diff * diff).sum(dim=2).amin(dim=1)  # all classes at once
        score = (-0.5 * d2 if self.metric == "cosine" else -d2.sqrt()).to(torch.float64)  # 1 - cos for unit vectors
        # an input whose features overflow scores as far from ID as possible (never NaN, never accepted)
        return torch.where(torch.isnan(score), -math.inf, score)


def grouped(parts_per_tap):
    """The taps' pooled blocks grouped by kind: ``[block 0 of every tap, block 1 of every tap, ...]``.

    Taps whose poolings give different numbers of blocks stay one after another.
    """
    parts_per_tap = list(parts_per_tap)
    if len({len(p) for p in parts_per_tap}) != 1:
        return [b for p in parts_per_tap for b in p]
    return [p[k] for k in range(len(parts_per_tap[0])) for p in parts_per_tap]


def grouped_order(widths_per_tap):
    """``input_order`` of :class:`DetectorHead` for :func:`grouped` blocks of these widths.

    :class:`BackboneFeatures` joins the blocks tap by tap (the means and
    standard deviations of tap 0, then of tap 1, ...).
    """
    blocks, at = [], 0  # (first column, width) of every block, in BackboneFeatures' order
    for widths in widths_per_tap:
        blocks.append([(at + start, w) for start, w in zip(np.cumsum([0, *widths[:-1]]), widths)])
        at += sum(widths)
    return np.concatenate([np.arange(start, start + w) for start, w in grouped(blocks)])


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
        """The detector's pooled features, in the order ``head`` takes them (``head.input_order``).

        Each tap is pooled on its own (``pooled_parts``); the blocks are
        grouped by kind, all the taps' means, then all their standard
        deviations, so that the head reads one contiguous row per input.
        """
        return torch.cat(grouped(pooled_parts(a, self.pooling, self.layout) for a in taps), dim=1)

    def outputs(self, x):
        """``(is_id, score, crossing, pooled)``: the decision, the payload tensors and the head's input."""
        taps, crossing = self.taps_and_crossing(x)
        pooled = self.pooled(taps)
        score = self.head(pooled)
        return score >= self.head.offset, score, crossing, pooled

    def forward(self, x):
        is_id, score, crossing, _ = self.outputs(x)
        payload = crossing[0] if len(crossing) == 1 else tuple(crossing)
        return EdgeOutput(is_id, score, payload)


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


class Split(tuple):
    """The two parts of a split model, as :meth:`~ShallowFeatureOODDetector.export_split` and
    :func:`load_split` return them.

    A pair: ``edge, cloud = split``; also ``split.edge``, ``split.cloud``, and
    ``split.manifest``: the verified ``split.json`` of a loaded split (None
    for one just exported). ``edge(x)`` returns :class:`EdgeOutput`;
    ``cloud(edge(x).payload)`` the model's output.

    Parameters
    ----------
    edge : torch.nn.Module or None
        The edge part (None when :func:`load_split` did not read it).
    cloud : torch.nn.Module or None
        The cloud part (likewise).
    manifest : dict, default=None
        The split's verified manifest, for a loaded split.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> split = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X).export_split()
    >>> edge, cloud = split
    >>> split, split.manifest is None, tuple(cloud(edge(X[:2]).payload).shape)
    (Split(edge=EdgeModule, cloud=CloudModule), True, (2, 10))
    """

    manifest: "dict | None"

    def __new__(cls, edge, cloud, manifest=None):
        split = super().__new__(cls, (edge, cloud))
        split.manifest = manifest
        return split

    def __getnewargs__(self):  # pickling and copying keep the manifest
        return (*self, self.manifest)

    @property
    def edge(self):
        return self[0]

    @property
    def cloud(self):
        return self[1]

    def __repr__(self):
        version = None if self.manifest is None else self.manifest.get("version", "?")[:12]
        return (f"Split(edge={type(self.edge).__name__}, cloud={type(self.cloud).__name__}"
                + ("" if version is None else f", version={version!r}") + ")")


class _ExportedProgram(nn.Module):
    """A module around a loaded ``torch.export`` program: always in evaluation mode (an exported program fixed
    its mode when it was exported; its module refuses ``train()``, so ``eval()`` here sets the flag only)."""

    def __init__(self, program):
        super().__init__()
        self.program = program
        self.training = False

    def train(self, mode=True):
        self.training = False
        return self


class ProgramEdge(_ExportedProgram):
    """A loaded edge program (``edge.pt2``, which returns the flat tuple ``(is_id, score, *payload)``) that returns
    :class:`EdgeOutput`, as the exported :class:`EdgeModule` does."""

    def forward(self, x):
        is_id, score, *crossing = self.program(x)
        return EdgeOutput(is_id, score, crossing[0] if len(crossing) == 1 else tuple(crossing))


class ProgramCloud(CloudModule):
    """A loaded cloud program (``cloud.pt2``) called as :class:`CloudModule` is: ``cloud(payload)`` with a tensor
    or a tuple of them, or ``cloud(*tensors)``; always in evaluation mode, as :class:`_ExportedProgram`."""

    def __init__(self, program):
        super().__init__(program)
        self.training = False

    train = _ExportedProgram.train


def build_split(detector):
    """The :class:`Split` ``(edge, cloud)`` of a fitted :class:`ShallowFeatureOODDetector`.

    Both are on the CPU, in evaluation mode, with gradients off; the
    detector itself is not changed.
    """
    features = detector.pipeline_["features"]
    module = copy.deepcopy(features.module_).cpu().eval()
    extra = features.extra_layers_
    example = torch.zeros((1, *features.input_shape_), dtype=input_dtype(module))
    prefix, suffix = split_model(module, features.layer, extra, example=example)
    with torch.no_grad():
        taps = prefix(example)[: 1 + len(extra)]
        taps = [*taps[1:], taps[0]]  # [*extra, activation], as BackboneFeatures pools them
        order = grouped_order([[int(b.shape[1]) for b in pooled_parts(t, features.pooling, features.layout)]
                               for t in taps])
    gaussianize = detector.pipeline_["gaussianize"]
    head = DetectorHead.from_steps(detector.pipeline_["select"], detector.pipeline_["distance"],
                                   gaussianize=None if gaussianize == "passthrough" else gaussianize,
                                   input_order=order)
    if example.dtype == torch.float64:  # a float64 backbone keeps its precision to the end
        head = head.double()
    edge = EdgeModule(prefix, head, features.pooling, n_extra=len(extra), layout=features.layout)
    edge.layer, edge.extra_layers = features.layer, list(extra)
    edge.target_tpr = float(detector.target_tpr)
    edge = edge.eval().requires_grad_(False)
    cloud = CloudModule(suffix).eval().requires_grad_(False)
    check_tensor_payload(prefix, example)
    return Split(edge, cloud)
