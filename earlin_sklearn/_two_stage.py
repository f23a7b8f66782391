"""Two-stage detection: the shallow detector on the edge (far OOD), a logit detector in the cloud (near OOD).

The cloud computes the full model for every uploaded input anyway; a detector
on its logits costs next to nothing there and sees what the shallow layer
cannot. The overall acceptance budget is split between the stages:
``target_tpr = edge TPR * cloud TPR`` with ``edge TPR = target_tpr **
edge_share``. Both thresholds are set on ID data only.
"""

from numbers import Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._detector import ShallowFeatureOODDetector
from ._edge import CloudModule, Split
from ._split import with_classifier_input
from ._threshold import ThresholdMixin, calibration_scores, n_rejected, offset_for_tpr
from .baselines import EnergyKNNDetector, LogitDetector, energy_knn_score, logit_score
from ._typing import Images, Labels, fit_context

# logit scores that need no input gradient (ODIN does), and energy + KNN on the penultimate features
CLOUD_METHODS = ("energy", "msp", "maxlogit", "energy+knn")


class CloudHead(nn.Module):
    """The cloud part with its detector: ``cloud(*payload) -> (logits, score, is_id)``.

    Parameters
    ----------
    cloud : CloudModule
        The cloud part of the split.
    method : {"energy", "msp", "maxlogit", "energy+knn"}
    offset : float
        The cloud stage's threshold (``score >= offset`` is ID).
    temperature : float, default=1.0
    knn : EnergyKNNDetector, default=None
        For ``"energy+knn"``: the fitted cloud stage whose bank, ``k`` and
        standardization the head copies; the cloud part then also returns the
        input of its classifier layer (``classifier_``), which the score reads.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector, TwoStageDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> two = TwoStageDetector(ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu")).fit(X.numpy())
    >>> edge, cloud = two.export_split()  # cloud is a CloudHead
    >>> logits, score, is_id = cloud(edge(X[:4]).payload)
    >>> is_id.tolist() == (two.cloud_.predict(X[:4].numpy()) == 1).tolist()
    True
    """

    def __init__(self, cloud, method, offset, temperature=1.0, knn=None):
        super().__init__()
        if method not in CLOUD_METHODS:
            raise ValueError(f"method must be one of {CLOUD_METHODS}; got {method!r}.")
        if (method == "energy+knn") != (knn is not None):
            raise ValueError("method='energy+knn' needs knn= the fitted EnergyKNNDetector (and only it does).")
        self.method = method
        self.temperature = float(temperature)
        self.register_buffer("offset", torch.tensor(float(offset), dtype=torch.float64))
        self.k = None
        if knn is not None:  # the cloud part returns (logits, penultimate features)
            cloud = CloudModule(with_classifier_input(cloud.suffix, knn.classifier_))
            self.k = int(knn.n_neighbors_)
            self.register_buffer("bank", torch.from_numpy(knn.bank_.copy()))
            self.register_buffer("standardization", torch.from_numpy(knn.standardization_.copy()))
        self.cloud = cloud

    def forward(self, *payload):
        if self.k is not None:
            logits, features = self.cloud(*payload)  # CloudModule: a payload tuple or the tensors
            score = energy_knn_score(logits, features, self.bank, self.k, self.standardization)
        else:
            logits = self.cloud(*payload)
            score = logit_score(logits, self.method, self.temperature)
        return logits, score, score >= self.offset


class TwoStageDetector(ThresholdMixin, OutlierMixin, BaseEstimator):
    """EARLIN on the edge and a logit detector in the cloud, fitted together on ID data.

    An input is ID when both stages accept it: the edge rejects far OOD
    before anything is uploaded, the cloud rejects what gets through (near
    OOD) from the logits it computes anyway.

    Parameters
    ----------
    edge : ShallowFeatureOODDetector
        The edge stage (unfitted; cloned). Its ``backbone`` is the model the
        cloud stage reads logits from.
    cloud_method : {"energy", "msp", "maxlogit", "energy+knn"}, default="energy"
        The cloud stage's score: a :class:`~earlin_sklearn.baselines.LogitDetector`'s, or
        :class:`~earlin_sklearn.baselines.EnergyKNNDetector`'s (energy plus
        KNN on the penultimate features; the exported cloud part then holds
        the training images' features, ``n x d`` float32).
    target_tpr : float, default=0.95
        Overall fraction of ID inputs accepted by both stages.
    edge_share : float, default=0.5
        How the budget is split: the edge accepts ``target_tpr **
        edge_share`` of the ID data and the cloud ``target_tpr ** (1 -
        edge_share)``; 1 puts all rejections on the edge.

    Attributes
    ----------
    edge_ : ShallowFeatureOODDetector
    cloud_ : LogitDetector or EnergyKNNDetector
    offset_ : float
        0: ``score_samples`` is the smaller of the two stages' margins.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector, TwoStageDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(60, 3, 32, 32).numpy()
    >>> two = TwoStageDetector(ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu")).fit(
    ...     X, np.arange(60) % 3)
    >>> round(two.edge_.target_tpr, 4), round(two.cloud_.target_tpr, 4)
    (0.9747, 0.9747)
    """

    _parameter_constraints = {
        "edge": [ShallowFeatureOODDetector],
        "cloud_method": [StrOptions(set(CLOUD_METHODS))],
        "target_tpr": [Interval(Real, 0, 1, closed="right")],
        "edge_share": [Interval(Real, 0, 1, closed="both")],
    }

    def __init__(self, edge: ShallowFeatureOODDetector, cloud_method: str = "energy", target_tpr: float = 0.95,
                 edge_share: float = 0.5) -> None:
        self.edge = edge
        self.cloud_method = cloud_method
        self.target_tpr = target_tpr
        self.edge_share = edge_share

    @fit_context(prefer_skip_nested_validation=False)
    def fit(self, X: Images, y: Labels = None) -> "TwoStageDetector":
        """Fit both stages on the same ID data.

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader
        y : array-like of shape (N,), default=None

        Returns
        -------
        self : object
        """
        edge_tpr, cloud_tpr = self._stage_tprs()
        self.edge_ = clone(self.edge).set_params(target_tpr=edge_tpr).fit(X, y)
        common = {"target_tpr": cloud_tpr, "batch_size": self.edge.batch_size, "device": self.edge.device,
                  "n_threads": self.edge.n_threads}
        if self.cloud_method == "energy+knn":
            self.cloud_ = EnergyKNNDetector(self.edge.backbone, **common).fit(X)
        else:
            self.cloud_ = LogitDetector(self.edge.backbone, self.cloud_method, **common).fit(X)
        self.n_features_in_ = self.edge_.n_features_in_
        self.offset_ = 0.0
        return self

    def _stage_tprs(self):
        """Each stage's share of the budget: ``target_tpr ** edge_share`` on the edge, the rest in the cloud."""
        return self.target_tpr ** self.edge_share, self.target_tpr ** (1.0 - self.edge_share)

    def calibrate_threshold(self, X):
        """Set both stages' thresholds again, from ID data that the fit did not use.

        The cloud stage's logit score is over-confident on the images the
        backbone was trained on, so a threshold set there rejects more new ID
        images than its budget. Here the edge stage is recalibrated on ``X`` at
        its share of the budget (``target_tpr ** edge_share``), and the cloud
        stage's threshold takes what remains: together they accept exactly
        ``target_tpr`` of ``X`` (at least, when rounding), an image rejected by
        both counted once. On held-out data the stages' rejections overlap,
        so the product rule of ``fit`` would accept more than ``target_tpr``.

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader
            ID images the backbone was not trained on.

        Returns
        -------
        self : object
        """
        check_is_fitted(self)
        owner = type(self).__name__
        edge_scores = calibration_scores(self.edge_.score_samples(X), owner, self.target_tpr)
        cloud_scores = calibration_scores(self.cloud_.score_samples(X), owner)  # checked; the warning came above
        self.edge_.offset_ = offset_for_tpr(edge_scores, self.edge_.target_tpr)
        passed = edge_scores >= self.edge_.offset_  # never empty: offset_for_tpr accepts target_tpr > 0 of them
        cloud_reject = max(0, n_rejected(edge_scores.size, self.target_tpr) - int(np.sum(~passed)))
        self.cloud_.offset_ = offset_for_tpr(cloud_scores[passed], 1.0 - cloud_reject / int(passed.sum()))
        return self

    def score_samples(self, X: Images) -> np.ndarray:
        """The smaller of the two stages' margins (``score - offset``): >= 0 only when both accept.

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader

        Returns
        -------
        scores : ndarray of shape (N,)
        """
        check_is_fitted(self)
        return np.minimum(self.edge_.decision_function(X), self.cloud_.decision_function(X))

    def export_split(self) -> Split:
        """The :class:`~earlin_sklearn.Split` ``(edge, cloud)``: the edge stage's edge module, and the cloud part
        with its detector.

        Returns
        -------
        split : Split
            ``edge, cloud = split``. ``edge`` is an :class:`EdgeModule`;
            ``cloud``, a :class:`CloudHead`: ``cloud(*payload)`` returns
            ``(logits, score, is_id)``.
        """
        check_is_fitted(self)
        edge, cloud = self.edge_.export_split()
        if isinstance(self.cloud_, EnergyKNNDetector):
            head = CloudHead(cloud, self.cloud_method, self.cloud_.offset_, knn=self.cloud_)
        else:
            temperature = self.cloud_.temperature if self.cloud_.temperature is not None else 1.0
            head = CloudHead(cloud, self.cloud_method, self.cloud_.offset_, temperature)
        return Split(edge, head.eval().requires_grad_(False))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.target_tags.required = False
        return tags
