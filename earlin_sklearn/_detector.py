"""ShallowFeatureOODDetector: the three steps composed, fitted from arrays or DataLoaders."""

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.validation import check_is_fitted

from ._distance import DistanceDetector, labels_usable
from ._distributed import DaskShards
from ._edge import Split, build_split
from ._features import BackboneFeatures, resolve_extra_layers
from ._inputs import is_torch_data, validate_fit_images, validate_images
from ._moments import FeatureMoments, check_statistics
from ._passes import LocalPasses, check_label_count, fit_power_transform, power_transform, with_labels
from ._selection import ChannelSelector
from ._threshold import ThresholdMixin
from ._torch import TorchStateMixin
from ._typing import Images, Labels, fit_context
from .exceptions import EarlinWarning

if TYPE_CHECKING:
    import torch


def head_scores(head, G):
    """Scores of the ``select`` and ``distance`` steps on Yeo-Johnson-transformed features ``G``.

    Rows that overflowed in the power transform (``inf``) are as far from ID
    as can be: ``-inf`` (the edge head agrees).
    """
    scores = np.full(G.shape[0], -np.inf)
    kept = np.isfinite(G).all(axis=1)
    if kept.any():
        with np.errstate(over="ignore", invalid="ignore"):
            scores[kept] = head.score_samples(G[kept])
    return scores


class ShallowFeatureOODDetector(TorchStateMixin, ThresholdMixin, OutlierMixin, BaseEstimator):
    """Early OOD detection from a shallow layer of a frozen CNN (EARLIN).

    Taps ``layer`` of the backbone (and, by default, the block just before
    it, which the edge computes anyway), pools each channel's feature map to
    its mean and standard deviation, makes each pooled feature close to
    Gaussian on the ID data (Yeo-Johnson), optionally keeps the most
    informative ones, and scores an input by its Mahalanobis distance to the
    nearest ID class centroid. The threshold comes from ID training data only;
    no OOD data and no retraining are needed. The defaults were selected among
    candidates by an ID-only criterion (held-out ID folds against pseudo-OOD
    made from them and against held-out classes, on three architectures);
    docs/benchmarks.rst says how the candidates themselves came about.

    Parameters
    ----------
    backbone : torch.nn.Module
        The pretrained model; copied and frozen, never modified.
    layer : str
        Dotted name of the detection layer, as in ``backbone.named_modules()``.
    n_channels : int, float, "all" or "auto", default="all"
        Pooled features kept (see :class:`ChannelSelector`). Keeping all of
        them tied with the best selection under the no-OOD protocol.
    criterion : {"auto", "variance", "fisher"}, default="auto"
        Channel-selection criterion (see :class:`ChannelSelector`).
    pooling : {"mean", "max", "meanstd"}, default="meanstd"
        Per-channel reduction (see :class:`BackboneFeatures`): each channel's
        mean (the EARLIN paper's reduction) and standard deviation.
    layout : {"auto", "channels", "tokens", "tokens+cls"}, default="auto"
        Axes of the tapped activations (see :class:`BackboneFeatures`):
        ``"auto"`` pools 4-D activations per channel and 3-D ones, the token
        sequences of vision transformers, per embedding dimension over tokens.
    extra_layers : "auto" or sequence of str, default="auto"
        Further taps inside the edge part whose pooled features join
        ``layer``'s (see :class:`BackboneFeatures`). ``"auto"``: the block
        that runs just before ``layer``'s last block (for ResNet's
        ``"layer1"``, ``"layer1.1"`` of ResNet-20; for ShuffleNet's
        ``"stage2"``, ``"stage2.2"``), or none when there is no such block;
        ``()`` taps ``layer`` alone.
    gaussianize : {"yeo-johnson"} or None, default="yeo-johnson"
        Per-feature power transform fitted on the ID features by maximum
        likelihood (:class:`sklearn.preprocessing.PowerTransformer`), so the
        Gaussian model behind the Mahalanobis distance fits; None uses the
        pooled features as they are.
    metric : {"mahalanobis", "euclidean", "cosine"}, default="mahalanobis"
        Distance (see :class:`DistanceDetector`).
    class_conditional : {"auto", True, False}, default="auto"
        Class centroids when labels are available (see :class:`DistanceDetector`).
    target_tpr : float, default=0.95
        Fraction of ID inputs to accept as ID (threshold set on out-of-fold
        scores of the ID training data, see :class:`DistanceDetector`).
    threshold_cv : int or None, default=5
        Folds used to set the threshold (see :class:`DistanceDetector`).
    batch_size : int, default=128
        Images per forward pass (and the batch size of a Dataset's loader).
    device : str or torch.device, default="auto"
        Where the backbone runs; ``"auto"`` picks CUDA when available.
    n_threads : int, "auto" or None, default="auto"
        torch intra-op threads while the backbone runs (see
        :class:`BackboneFeatures`): ``"auto"`` is half the cores, at least 1.
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        Mixed precision for the backbone while fitting and scoring (see
        :class:`BackboneFeatures`); the exported edge module runs in the
        backbone's own dtype.
    verbose : int, default=0
        ``verbose > 0`` shows a progress bar during feature extraction.

    Attributes
    ----------
    pipeline_ : sklearn.pipeline.Pipeline
        The fitted steps ``features`` (:class:`BackboneFeatures`),
        ``gaussianize`` (:class:`~sklearn.preprocessing.PowerTransformer` or
        ``"passthrough"``), ``select`` (:class:`ChannelSelector`) and
        ``distance`` (:class:`DistanceDetector`); works on arrays.
    offset_ : float
        Threshold on ``score_samples``. It lives in one place, the
        ``distance`` step: setting it here moves the threshold of ``predict``,
        ``pipeline_``, ``export_split`` and ``save_split`` alike.
    n_features_in_ : int
        Number of input channels.

    Examples
    --------
    >>> import torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    >>> X = torch.rand(100, 3, 16, 16)
    >>> det = ShallowFeatureOODDetector(net, layer="1", metric="euclidean").fit(X)
    >>> det.predict(X[:4]).tolist(), det.predict(X[:4] * 50).tolist()
    ([1, 1, 1, 1], [-1, -1, -1, -1])
    """

    _torch_param = ("backbone", None)  # the fitted copy lives in pipeline_["features"].module_

    def _fitted_copy_of_param(self):
        pipeline = getattr(self, "pipeline_", None)
        return pipeline["features"].module_ if pipeline is not None else None

    # the steps' own constraints, inherited rather than copied; only the composite's own choices are new
    _parameter_constraints: dict = {
        **BackboneFeatures._parameter_constraints,
        **ChannelSelector._parameter_constraints,
        **DistanceDetector._parameter_constraints,
        "extra_layers": [StrOptions({"auto"}), tuple, list],
        "gaussianize": [StrOptions({"yeo-johnson"}), None],
    }

    def __init__(
        self,
        backbone: "torch.nn.Module | None",
        layer: str,
        *,
        n_channels: "int | float | str" = "all",
        criterion: str = "auto",
        pooling: str = "meanstd",
        layout: str = "auto",
        extra_layers: "str | Sequence[str]" = "auto",
        gaussianize: "str | None" = "yeo-johnson",
        metric: str = "mahalanobis",
        class_conditional: "bool | str" = "auto",
        target_tpr: float = 0.95,
        threshold_cv: "int | None" = 5,
        batch_size: int = 128,
        device: "str | torch.device" = "auto",
        n_threads: "int | str | None" = "auto",
        precision: str = "float32",
        verbose: int = 0,
    ) -> None:
        self.backbone = backbone
        self.layer = layer
        self.n_channels = n_channels
        self.criterion = criterion
        self.pooling = pooling
        self.layout = layout
        self.extra_layers = extra_layers
        self.gaussianize = gaussianize
        self.metric = metric
        self.class_conditional = class_conditional
        self.target_tpr = target_tpr
        self.threshold_cv = threshold_cv
        self.batch_size = batch_size
        self.device = device
        self.n_threads = n_threads
        self.precision = precision
        self.verbose = verbose

    @fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Images, y: Labels = None) -> "ShallowFeatureOODDetector":
        """Fit on in-distribution data, streaming it batch by batch.

        Only the per-class statistics of the pooled features are kept (see
        ``moments_``), never the images nor all the features, so a Dataset or
        DataLoader of any size fits in bounded memory. With more than 10,000
        images and ``gaussianize`` on, the power transform is fitted on a
        uniform sample of 10,000 images' features, then the statistics of the
        transformed features are accumulated from a temporary file of the
        pooled features (8 bytes per feature and image, deleted afterwards):
        the backbone runs once per image.

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset, DataLoader or DaskShards
            ID training images. A Dataset or DataLoader may yield ``x`` or
            ``(x, y)`` batches; their labels are used as ``y``. A
            :class:`DaskShards` spreads the forward passes over the workers of
            a Dask cluster and gives the same detector.
        y : array-like of shape (N,), default=None
            ID class labels (overrides labels from a loader). Optional.

        Returns
        -------
        self : object
        """
        owner = type(self).__name__
        if isinstance(X, DaskShards):
            if y is not None:
                raise ValueError(f"{owner}.fit(DaskShards(...)) takes its labels from the dataset's (x, y) items; "
                                 "y must be None.")
            features = self._features()._fit(X.first_input(owner), owner)
            run_pass = X.pass_runner(features, owner)
        else:
            X, sample = validate_fit_images(self, X, self.batch_size)  # validated once, in this class's name
            features = self._features()._fit(sample, owner)
            run_pass = LocalPasses(features, X, y, owner)
        n_folds = self.threshold_cv or 1
        try:
            if self.gaussianize is None:
                gaussianize, moments = "passthrough", run_pass(None, n_folds, "full")
            else:
                # pass 1: a uniform sample of the raw features fits the power transform
                raw = run_pass(None, 1, "diagonal", keep=True)
                gaussianize = fit_power_transform(raw.sample_rows)
                if raw.n_rows <= raw.reservoir_size:  # the sample holds every row: no second pass
                    rows, labels = raw.ordered_sample()
                    moments = FeatureMoments(raw.n_features, n_folds).update(power_transform(gaussianize, rows, owner), labels)
                else:  # pass 2 over the kept features (or, on Dask, the data again)
                    moments = run_pass(gaussianize, n_folds, "full")
        finally:
            run_pass.close()
        self._set_fitted(features, gaussianize, moments)
        if self.target_tpr < 1.0 and moments.n_rows * (1.0 - self.target_tpr) < 1.0 - 1e-9:
            warnings.warn(f"{owner} was fitted on {moments.n_rows} ID images: at target_tpr={self.target_tpr:g} the "
                          "threshold cannot reject a single one of them, so it is no estimate of the rate it was "
                          f"asked for; fit on at least {int(np.ceil(1.0 / (1.0 - self.target_tpr) - 1e-9))} images (100 or "
                          "more for a stable threshold).", EarlinWarning, stacklevel=3)
        return self

    def partial_fit(self, X: Images, y: Labels = None) -> "ShallowFeatureOODDetector":
        """Add a batch of ID images to the statistics and refit from all batches seen.

        The first call fits the backbone tap and the power transform (on
        that call's images: give it a representative sample, a thousand
        images or more); later calls only add statistics. Batch by batch
        gives the same detector as one call on all the images in the same
        order, except for the power transform, fitted on the first call only.

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader
        y : array-like of shape (N,), default=None

        Returns
        -------
        self : object
        """
        owner = type(self).__name__
        check_statistics(self, "pipeline_")
        if not hasattr(self, "moments_"):
            self._validate_params()
            X, sample = validate_fit_images(self, X, self.batch_size)
            features = self._features()._fit(sample, owner)
            check_label_count(X, y, owner)
            parts = list(with_labels(features._pooled_batches(X, owner), y, owner))
            if not parts:
                raise ValueError(f"{owner} found no images: the data is empty.")
            F = np.concatenate([F for F, _ in parts])
            y = None if any(yb is None for _, yb in parts) else np.concatenate([yb for _, yb in parts])
            gaussianize = "passthrough" if self.gaussianize is None else fit_power_transform(F)
            moments = FeatureMoments(F.shape[1], self.threshold_cv or 1)
            moments.update(power_transform(gaussianize, F, owner), y)
            self._set_fitted(features, gaussianize, moments)
            return self
        check_is_fitted(self, "pipeline_")
        features, gaussianize = self.pipeline_["features"], self.pipeline_["gaussianize"]
        self._check_same_structure(features, gaussianize)
        if not is_torch_data(X):
            X = validate_images(self, X, reset=False, input_shape=features.input_shape_)
        check_label_count(X, y, owner)
        for F, yb in with_labels(features._pooled_batches(X, owner), y, owner):
            self.moments_.update(power_transform(gaussianize, F, owner), yb)
        self._set_fitted(features, gaussianize, self.moments_)
        return self

    def _check_same_structure(self, features, gaussianize):
        """Refuse a ``partial_fit`` after ``set_params`` changed what the statistics so far were computed from."""
        now = self._features()
        changed = [name for name in ("layer", "pooling", "layout", "extra_layers", "precision")
                   if getattr(now, name) != getattr(features, name)]
        if now.backbone is not features.backbone:
            changed.insert(0, "backbone")
        if (self.gaussianize is None) != (isinstance(gaussianize, str) and gaussianize == "passthrough"):
            changed.append("gaussianize")
        if changed:
            raise ValueError(
                f"{type(self).__name__}.partial_fit: {', '.join(changed)} changed (set_params) since the first "
                "partial_fit call, and the statistics gathered so far come from the old value. Call fit to start "
                "again with the new one, or set it back."
            )

    def _features(self):
        extra_layers = resolve_extra_layers(self.backbone, self.layer, self.extra_layers)
        return BackboneFeatures(
            self.backbone,
            self.layer,
            pooling=self.pooling,
            layout=self.layout,
            extra_layers=tuple(extra_layers),
            batch_size=self.batch_size,
            device=self.device,
            n_threads=self.n_threads,
            precision=self.precision,
            verbose=self.verbose,
        )

    def _set_fitted(self, features, gaussianize, moments):
        """The pipeline from the fitted tap and transform and the statistics of the transformed features."""
        select, distance = self._fit_head(moments, stacklevel=5)
        self.moments_ = moments
        self.pipeline_ = Pipeline(
            [("features", features), ("gaussianize", gaussianize), ("select", select), ("distance", distance)]
        )
        self.n_features_in_ = features.n_features_in_
        if hasattr(features, "feature_names_in_"):
            self.feature_names_in_ = features.feature_names_in_

    def _fit_head(self, moments, stacklevel=4, threshold=True):
        """The fitted ``select`` and ``distance`` steps from the statistics of the transformed features.

        ``threshold=False``: no decision threshold (``offset_``), for a head that is only scored.
        """
        owner = type(self).__name__
        if moments.n_rows == 0:
            raise ValueError(f"{owner} found no images: the data is empty.")
        labelled = bool(moments.labelled)
        if self.class_conditional is True and not labelled:
            raise ValueError("class_conditional=True needs class labels y.")
        if labelled and self.class_conditional is not False:
            labelled = labels_usable(moments.class_counts(), owner, required=self.class_conditional is True,
                                     stacklevel=stacklevel)
        select = ChannelSelector(n_channels=self.n_channels, criterion=self.criterion)
        select._fit_moments(moments, labelled=labelled)
        select.n_features_in_ = moments.n_features
        distance = DistanceDetector(
            metric=self.metric,
            class_conditional=self.class_conditional,
            target_tpr=self.target_tpr,
            threshold_cv=self.threshold_cv,
        )
        distance._fit_moments(moments, columns=select.channels_,
                              labelled=labelled and self.class_conditional is not False, owner=owner,
                              threshold=threshold)
        distance.n_features_in_ = int(select.channels_.size)
        return select, distance

    @property
    def offset_(self):
        """Threshold on ``score_samples``: the ``distance`` step's, the one value every path reads."""
        check_is_fitted(self, "pipeline_")
        return self.pipeline_["distance"].offset_

    @offset_.setter
    def offset_(self, value):
        check_is_fitted(self, "pipeline_")
        self.pipeline_["distance"].offset_ = float(value)

    def score_samples(self, X: Images) -> np.ndarray:
        """Higher = more in-distribution (negative distance to the nearest centroid).

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader

        Returns
        -------
        scores : ndarray of shape (N,)
        """
        check_is_fitted(self, "pipeline_")
        if not is_torch_data(X):
            X = validate_images(self, X, reset=False, input_shape=self.pipeline_["features"].input_shape_)
        F = self.pipeline_["features"]._features_and_labels(X, type(self).__name__)[0]
        # finite images whose activations overflow are as far from ID as can be: -inf (the edge head agrees)
        # and so are features that overflow in the power transform (x ** lambda): the edge head answers OOD too
        scores = np.full(F.shape[0], -np.inf)
        finite = np.flatnonzero(np.isfinite(F).all(axis=1))
        if finite.size:
            scores[finite] = head_scores(self.pipeline_[2:], power_transform(self.pipeline_["gaussianize"], F[finite]))
        return scores

    def export_split(self) -> Split:
        """Split the backbone at ``layer`` into the edge and cloud modules.

        The edge module runs the backbone up to the detection layer and the
        fitted detector (as torch tensors: no scikit-learn needed on the
        device); the cloud module runs the rest. Both are new modules on the
        CPU; this detector is not changed.

        Returns
        -------
        split : Split
            ``edge, cloud = split`` (as :func:`load_split` returns a saved one).
            ``edge`` is an :class:`EdgeModule`: ``edge(x)`` ->
            ``EdgeOutput(is_id, score, payload)``; ``is_id`` and ``score``
            equal ``predict(x) == 1`` and ``score_samples(x)``. ``cloud``, a
            :class:`CloudModule`: ``cloud(edge(x).payload)`` equals ``backbone(x)``.

        See Also
        --------
        earlin_sklearn.save_split : write both parts as torch.export and ONNX files.
        earlin_sklearn.split_cost : parameters, FLOPs and payload bytes of each part.
        """
        check_is_fitted(self, "pipeline_")
        return build_split(self)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.target_tags.required = False
        return tags
