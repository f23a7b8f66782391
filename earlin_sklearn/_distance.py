"""Distance scoring: how far an input's reduced features lie from the ID centroids."""

import warnings
from numbers import Integral, Real

import numpy as np
from scipy.linalg import pinvh
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._moments import FeatureMoments, PartialFitMixin
from ._threshold import ThresholdMixin, offset_for_tpr
from ._inputs import batch_labels
from ._typing import fit_context
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


def labels_usable(counts, owner, required=False, stacklevel=4):
    """Whether classes with these row counts can define class centroids (a warning or an error if not).

    A one-sample class has no spread: its centroid is that sample, the pooled
    covariance loses rank, and with every class of one sample every input
    scores 0 (accept everything). Labels that are sample ids or indices look
    like that.
    """
    counts = np.asarray(counts)
    if counts.size and counts.min() >= 2:
        return True
    few = int((counts < 2).sum())
    message = (f"{few} of {counts.size} classes have a single sample, so class centroids cannot be "
               "estimated (are the labels sample ids or indices?).")
    if required:
        raise ValueError(f"{owner}: {message} Pass class labels with at least 2 samples per class, "
                         "or class_conditional=False.")
    warnings.warn(f"{owner}: {message} Using one global centroid instead.", EarlinWarning, stacklevel=stacklevel)
    return False


def ledoit_wolf_covariance(scatter, n_samples, fourth):
    """Ledoit-Wolf shrunk covariance of centred rows ``R`` from mergeable sums.

    Parameters
    ----------
    scatter : ndarray of shape (n_features, n_features)
        ``R.T @ R``.
    n_samples : float
        Rows of ``R``.
    fourth : float
        ``sum_i ||R_i||^4``, which equals the sum of ``(R**2).T @ (R**2)``,
        the only other term the shrinkage intensity needs.

    Returns
    -------
    covariance : ndarray of shape (n_features, n_features)
        ``LedoitWolf(assume_centered=True).fit(R).covariance_``, term by term
        (scikit-learn's ``ledoit_wolf_shrinkage``), without ``R`` itself.
    """
    n_features = scatter.shape[0]
    emp_cov = scatter / n_samples
    if n_features == 1:
        return emp_cov
    trace = np.trace(emp_cov)
    mu = trace / n_features
    delta_ = np.sum(scatter**2) / n_samples**2
    beta = (fourth / n_samples - delta_) / (n_features * n_samples)
    delta = (delta_ - 2.0 * mu * trace + n_features * mu**2) / n_features
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    covariance = (1.0 - shrinkage) * emp_cov
    covariance.flat[:: n_features + 1] += shrinkage * mu
    return covariance


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


class DistanceDetector(PartialFitMixin, ThresholdMixin, OutlierMixin, BaseEstimator):
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
        A row's fold is a hash of its position in the data, so fitting in
        batches or shards gives the same folds. With more than
        10,000 rows, the
        threshold and the Ledoit-Wolf shrinkage are computed on a uniform
        sample of that many rows; everything else uses every row.

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
    moments_ : FeatureMoments
        The mergeable statistics everything above is computed from: per fold
        and class, counts and means; per fold, the pooled within-class
        scatter; and a uniform sample of at most 10,000 rows. ``partial_fit``
        adds to them.
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

    @fit_context(prefer_skip_nested_validation=True)
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
        return self._partial_fit(X, y, reset=True)

    _fitted_marker = "centroids_"

    def _partial_fit(self, X, y, reset):
        use_classes = self.class_conditional is True or (self.class_conditional == "auto" and y is not None)
        if use_classes:
            if y is None:
                raise ValueError("class_conditional=True needs class labels y.")
            y = batch_labels(y, X.shape[0], type(self).__name__)
        if reset:
            self.moments_ = FeatureMoments(X.shape[1], n_folds=self.threshold_cv or 1)
        self.moments_.update(X, y if use_classes else None)
        return self._fit_moments(self.moments_)

    def _fit_moments(self, moments, columns=None, labelled=None, owner=None, threshold=True):
        """Fitted attributes from the statistics ``moments`` (of the ``columns`` given, or all).

        ``labelled``: whether to use class centroids, when the caller has
        decided it (a composite, which names itself in the warning); None
        decides from the class counts here. ``owner`` names the estimator the user called in errors.
        ``threshold=False`` leaves out ``offset_`` (a model only scored, never asked to decide).
        """
        owner = owner or type(self).__name__
        if moments.n_rows < 2:
            raise ValueError(f"{owner} needs at least 2 ID samples; got n_samples={moments.n_rows}.")
        if labelled is None:
            labelled = bool(moments.labelled) and labels_usable(
                moments.class_counts(), type(self).__name__, required=self.class_conditional is True, stacklevel=5)
        pooled = not labelled
        self.classes_ = None if pooled else moments.class_labels()
        self.centroids_, self.precision_ = self._model(moments, None, pooled, columns, check=owner)[1:]
        self.whitening_ = None if self.precision_ is None else whitening_from_precision(self.precision_)
        if threshold:
            self.offset_ = offset_for_tpr(self._threshold_scores(moments, pooled, columns), self.target_tpr)
        return self

    def _model(self, moments, exclude_fold, pooled, columns, check=None):
        """``(slots, centroids, precision)`` of the rows outside ``exclude_fold``.

        ``check``: the name to use in an error when the rows do not vary (None: no check).
        """
        slots, counts, centroids, scatter = moments.model(exclude_fold, pooled=pooled, columns=columns)
        if self.metric != "mahalanobis":
            return slots, centroids, None
        if check and not np.any(scatter):
            raise ValueError(
                f"{check}: the ID features do not vary around their centroids (all samples "
                "identical within their class), so no covariance can be estimated. Fit on more varied "
                "ID data, or use metric='euclidean'."
            )
        # the fourth-moment term of Ledoit-Wolf from the reservoir (all the rows, unless there are more
        # than moments.reservoir_size of them: then a uniform sample, scaled to the row count)
        rows, row_slots, _ = moments.sample(exclude_fold=exclude_fold, columns=columns)
        position = np.zeros(len(moments.labels), dtype=np.intp)
        if not pooled:
            position[slots] = np.arange(slots.size)
        residual = rows - centroids[position[row_slots]]
        residual_sq = np.einsum("ij,ij->i", residual, residual)
        fourth = np.sum(residual_sq**2) * (counts.sum() / max(rows.shape[0], 1))
        return slots, centroids, pinvh(ledoit_wolf_covariance(scatter, counts.sum(), fourth))

    def _threshold_scores(self, moments, pooled, columns):
        """Out-of-fold scores of the reservoir rows (each scored by a model fitted without its fold)."""
        cv = self.threshold_cv
        if cv is None or moments.n_rows < 2 * cv or np.any(moments.counts.sum(axis=1) == moments.n_rows):
            rows = moments.sample(columns=columns)[0]
            return self._scores(rows)
        scores = []
        for f in range(cv):
            held_out = moments.sample(only_fold=f, columns=columns)[0]
            if held_out.shape[0] == 0:
                continue
            _, centroids, precision = self._model(moments, f, pooled, columns)
            whitening = None if precision is None else whitening_from_precision(precision)
            scores.append(-min_centroid_distance(held_out, centroids, self.metric, whitening)[0])
        return np.concatenate(scores)

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
