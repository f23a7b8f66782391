"""Distance scoring: how far an input's reduced features lie from the ID centroids."""

import warnings
from numbers import Integral, Real

import numpy as np
from scipy.linalg import pinvh
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._threshold import ThresholdMixin, offset_for_tpr
from .exceptions import EarlinWarning

METRICS = ("mahalanobis", "euclidean", "cosine")


def whitening_from_precision(precision):
    """A matrix ``W`` with ``W @ W.T == precision`` (symmetric PSD square root).

    Mahalanobis distances are then Euclidean distances between ``x @ W`` and
    ``centroid @ W``, computed from differences: no cancellation between large
    terms, unlike the expanded ``x'Px - 2 x'P mu + mu'P mu``.
    """
    eigval, eigvec = np.linalg.eigh(precision)
    return eigvec * np.sqrt(np.clip(eigval, 0.0, None))


def usable_labels(y, owner, required=False):
    """``y`` if it can define class centroids, else None (with a warning) or an error when ``required``.

    A one-sample class has no spread: its centroid is that sample, the pooled
    covariance loses rank, and with every class of one sample every input
    scores 0 (accept everything). Labels that are sample ids or indices look
    like that.
    """
    if y is None:
        return None
    y = np.asarray(y).reshape(-1)
    _, counts = np.unique(y, return_counts=True)
    if counts.min() >= 2:
        check_classification_targets(y)
        return y
    few = int((counts < 2).sum())
    message = (f"{few} of {counts.size} classes have a single sample, so class centroids cannot be "
               "estimated (are the labels sample ids or indices?).")
    if required:
        raise ValueError(f"{owner}: {message} Pass class labels with at least 2 samples per class, "
                         "or class_conditional=False.")
    warnings.warn(f"{owner}: {message} Using one global centroid instead.", EarlinWarning, stacklevel=3)
    return None


def min_centroid_distance(X, centroids, metric, whitening=None):
    """Distance from each row of ``X`` to its nearest centroid.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    centroids : ndarray of shape (n_centroids, n_features)
    metric : {"mahalanobis", "euclidean", "cosine"}
    whitening : ndarray of shape (n_features, n_features) or None
        For Mahalanobis (see :func:`whitening_from_precision`).

    Returns
    -------
    distance : ndarray of shape (n_samples,)
    nearest : ndarray of shape (n_samples,)
        Index of the nearest centroid.
    """
    if metric == "cosine":
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    elif metric == "mahalanobis":
        X, centroids = X @ whitening, centroids @ whitening
    d = np.empty((X.shape[0], centroids.shape[0]))
    for k, c in enumerate(centroids):
        diff = X - c
        d[:, k] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    if metric == "cosine":
        d = 0.5 * d**2  # = 1 - cos for unit vectors, computed from differences
    nearest = d.argmin(axis=1)
    return d[np.arange(d.shape[0]), nearest], nearest


class DistanceDetector(ThresholdMixin, OutlierMixin, BaseEstimator):
    """OOD detector on reduced features: distance to the nearest ID centroid.

    With class labels the centroids are the class means (distance to the
    nearest one), without them a single global mean. The threshold comes from
    ID training data only: ``offset_`` is set so that a ``target_tpr`` fraction
    of the training samples are accepted as ID.

    Parameters
    ----------
    metric : {"mahalanobis", "euclidean", "cosine"}, default="mahalanobis"
        Mahalanobis uses one covariance shared by all classes (tied, as in
        Lee et al. 2018), estimated with Ledoit-Wolf shrinkage and inverted
        with a pseudo-inverse, so it never fails on singular or tiny data.
    class_conditional : {"auto", True, False}, default="auto"
        Class centroids (``True``: ``y`` required), a global centroid
        (``False``: ``y`` ignored), or class centroids when ``y`` is given.
    target_tpr : float, default=0.95
        Fraction of ID inputs that ``predict`` should accept as ID.
    threshold_cv : int or None, default=5
        The threshold is set on out-of-fold scores of a ``threshold_cv``-fold
        split of the training data (each fold scored by centroids and
        covariance fitted without it). In-sample scores are optimistic: with
        tens of channels, a Mahalanobis threshold set on them accepts
        noticeably fewer than ``target_tpr`` of new ID inputs. ``None`` (or
        fewer than ``2 * threshold_cv`` samples) uses the in-sample scores.

    Attributes
    ----------
    centroids_ : ndarray of shape (n_centroids, n_features)
    classes_ : ndarray of shape (n_centroids,) or None
        Class of each centroid; None with a global centroid.
    precision_ : ndarray of shape (n_features, n_features) or None
        Inverse shared covariance (Mahalanobis only).
    whitening_ : ndarray of shape (n_features, n_features) or None
        ``W`` with ``W @ W.T == precision_``: Mahalanobis distances are computed
        as Euclidean distances after ``X @ W`` (Mahalanobis only).
    offset_ : float
        Threshold on ``score_samples``; ``decision_function = score_samples - offset_``.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from earlin_sklearn import DistanceDetector
    >>> X = np.random.RandomState(0).randn(200, 3)
    >>> det = DistanceDetector(metric="euclidean").fit(X)
    >>> det.predict([[0.0, 0.0, 0.0], [8.0, 8.0, 8.0]])
    array([ 1, -1])
    """

    _parameter_constraints = {
        "metric": [StrOptions(set(METRICS))],
        "class_conditional": [StrOptions({"auto"}), "boolean"],
        "target_tpr": [Interval(Real, 0, 1, closed="right")],
        "threshold_cv": [Interval(Integral, 2, None, closed="left"), None],
    }

    def __init__(self, metric="mahalanobis", class_conditional="auto", target_tpr=0.95, threshold_cv=5):
        self.metric = metric
        self.class_conditional = class_conditional
        self.target_tpr = target_tpr
        self.threshold_cv = threshold_cv

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Estimate centroids (and covariance), then the threshold.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Reduced features of ID training data.
        y : array-like of shape (n_samples,), default=None
            ID class labels.

        Returns
        -------
        self : object
        """
        X = validate_data(self, X, reset=True, dtype=np.float64)
        if X.shape[0] < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 ID samples; got n_samples={X.shape[0]}.")
        use_classes = self.class_conditional is True or (self.class_conditional == "auto" and y is not None)
        if use_classes:
            if y is None:
                raise ValueError("class_conditional=True needs class labels y.")
            y = np.asarray(y).reshape(-1)
            if y.shape[0] != X.shape[0]:
                raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]}.")
            y = usable_labels(y, type(self).__name__, required=self.class_conditional is True)
        if use_classes and y is not None:
            self.classes_, y_idx = np.unique(y, return_inverse=True)
        else:
            self.classes_, y_idx = None, np.zeros(X.shape[0], dtype=np.intp)
        self.centroids_, self.precision_ = self._estimate(X, y_idx)
        self.whitening_ = None if self.precision_ is None else whitening_from_precision(self.precision_)
        self.offset_ = offset_for_tpr(self._threshold_scores(X, y_idx), self.target_tpr)
        return self

    def _estimate(self, X, y_idx):
        """Centroids (one per label index) and, for Mahalanobis, the shared precision."""
        k = int(y_idx.max()) + 1
        counts = np.bincount(y_idx, minlength=k).astype(np.float64)
        centroids = np.zeros((k, X.shape[1]))
        np.add.at(centroids, y_idx, X)
        centroids /= np.maximum(counts, 1.0)[:, None]
        precision = None
        if self.metric == "mahalanobis":
            residual = X - centroids[y_idx]
            if not np.any(residual):
                raise ValueError(
                    f"{type(self).__name__}: the ID features do not vary around their centroids (all samples "
                    "identical within their class), so no covariance can be estimated. Fit on more varied "
                    "ID data, or use metric='euclidean'."
                )
            covariance = LedoitWolf(assume_centered=True).fit(residual).covariance_
            precision = pinvh(covariance)
        return centroids, precision

    def _threshold_scores(self, X, y_idx):
        cv = self.threshold_cv
        if cv is None or X.shape[0] < 2 * cv:
            return self._scores(X)
        counts = np.bincount(y_idx)
        if counts.size > 1 and counts.min() >= cv:
            folds = StratifiedKFold(cv, shuffle=True, random_state=0).split(X, y_idx)
        else:
            folds = KFold(cv, shuffle=True, random_state=0).split(X)
        scores = np.empty(X.shape[0])
        for train, held_out in folds:
            # classes missing from a training fold keep no centroid there
            _, local = np.unique(y_idx[train], return_inverse=True)
            centroids, precision = self._estimate(X[train], local)
            whitening = None if precision is None else whitening_from_precision(precision)
            scores[held_out] = -min_centroid_distance(X[held_out], centroids, self.metric, whitening)[0]
        return scores

    def _scores(self, X):
        distance, _ = min_centroid_distance(X, self.centroids_, self.metric, self.whitening_)
        # non-finite features (overflow after a power transform) are as far from ID as can be
        return -np.nan_to_num(distance, nan=np.inf)

    def score_samples(self, X):
        """Negative distance to the nearest centroid: higher = more in-distribution.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self._scores(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        return tags
