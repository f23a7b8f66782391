"""Channel selection: keep the most informative pooled channels, chosen from ID data only."""

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._moments import FeatureMoments, PartialFitMixin
from ._inputs import batch_labels
from ._typing import fit_context
from .exceptions import EarlinWarning

CRITERIA = ("auto", "variance", "fisher")


def _column_statistics(moments, pooled=False):
    """Class counts, class means and each column's within-class sum of squared deviations (full or diagonal
    statistics alike)."""
    _, counts, means, within = moments.model(pooled=pooled)
    return counts, means, (np.diag(within) if within.ndim == 2 else within)


def variance_score(moments):
    """Label-free: each channel's variance over the ID samples.

    A channel that barely moves over the ID data carries no information to
    tell one input from another.
    """
    counts, _, within = _column_statistics(moments, pooled=True)
    return within / counts.sum()


def fisher_score(moments):
    """With labels: between-class variance of the channel's class means divided
    by its mean within-class variance (the Fisher score).

    Channels that separate the ID classes are the ones a class-conditional
    distance relies on.
    """
    counts, means, within = _column_statistics(moments)
    n = counts.sum()
    overall = (counts[:, None] * means).sum(axis=0) / n
    between = (counts[:, None] * (means - overall) ** 2).sum(axis=0) / n
    return between / (within / n + np.finfo(np.float64).eps * (1.0 + overall**2))


class ChannelSelector(PartialFitMixin, SelectorMixin, BaseEstimator):
    """Keep the most informative channels, scored on ID training data only.

    Parameters
    ----------
    n_channels : int, float, "all" or "auto", default="auto"
        How many columns to keep: a count (capped at the number of columns,
        with a warning), a fraction in (0, 1] of the columns, or all of them.
        ``"auto"``: all of them. Under the no-OOD protocol of
        docs/benchmarks.rst (held-out ID folds against pseudo-OOD, three
        architectures) no selection beat keeping every column, so the
        criterion's ``scores_`` are computed (to inspect, or to set a count or
        fraction) but nothing is dropped by default.
    criterion : {"auto", "variance", "fisher"}, default="auto"
        ``"variance"`` needs no labels (each channel's variance over the ID
        data); ``"fisher"`` needs class labels (between-class over within-class
        variance). ``"auto"`` uses ``"fisher"`` when ``y`` with two or more
        classes is given, ``"variance"`` otherwise.

    Attributes
    ----------
    scores_ : ndarray of shape (n_features,)
        The criterion's score of each column (higher = more informative).
    channels_ : ndarray of shape (n_selected,)
        Indices of the kept columns, in ascending order.
    criterion_ : str
        The criterion actually used.
    moments_ : FeatureMoments
        Per-class counts, means and per-column sums of squared deviations
        the scores come from; ``partial_fit`` adds to them.
    n_features_in_ : int
        Number of columns seen in ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> from earlin_sklearn import ChannelSelector
    >>> X = np.random.RandomState(0).rand(20, 5) * [1, 5, 1, 9, 1]
    >>> ChannelSelector(n_channels=2, criterion="variance").fit(X).channels_
    array([1, 3])
    """

    _parameter_constraints = {
        "n_channels": [
            Interval(Integral, 1, None, closed="left"),
            Interval(Real, 0, 1, closed="right"),
            StrOptions({"all", "auto"}),
        ],
        "criterion": [StrOptions(set(CRITERIA))],
    }

    def __init__(self, n_channels="auto", criterion="auto"):
        self.n_channels = n_channels
        self.criterion = criterion

    @fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Score the columns and keep the best ``n_channels``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Pooled features of ID data.
        y : array-like of shape (n_samples,), default=None
            ID class labels; required by ``criterion="fisher"``.

        Returns
        -------
        self : object
        """
        X = validate_data(self, X, reset=True, dtype=np.float64)
        return self._partial_fit(X, y, reset=True)

    _fitted_marker = "channels_"

    def _partial_fit(self, X, y, reset):
        y = batch_labels(y, X.shape[0], type(self).__name__)
        if reset:
            self.moments_ = FeatureMoments(X.shape[1], reservoir_size=0, scatter="diagonal")
        self.moments_.update(X, y)
        return self._fit_moments(self.moments_)

    def _fit_moments(self, moments, labelled=None):
        """Scores and selection from per-class statistics of the columns.

        ``labelled=False`` ignores the labels in ``moments`` (a composite that
        found them unusable); None uses them when there are any.
        """
        criterion = self.criterion
        labelled = bool(moments.labelled) if labelled is None else labelled
        if criterion == "auto":
            criterion = "fisher" if labelled and len(moments.labels) > 1 else "variance"
        if criterion == "fisher":
            if not labelled:
                raise ValueError('criterion="fisher" needs class labels y; use "variance" without labels.')
            self.scores_ = fisher_score(moments)
        else:
            self.scores_ = variance_score(moments)
        self.criterion_ = criterion
        k = self._n_selected(moments.n_features, criterion)
        order = np.argsort(-self.scores_, kind="stable")
        self.channels_ = np.sort(order[:k])
        return self

    def _n_selected(self, n_features, criterion):
        n = self.n_channels
        if n == "auto":
            n = "all"
        if n == "all":
            return n_features
        if isinstance(n, Integral) and not isinstance(n, bool):
            if n > n_features:
                warnings.warn(
                    f"n_channels={n} is more than the {n_features} columns; all are kept.",
                    EarlinWarning,
                    stacklevel=3,
                )
                return n_features
            return int(n)
        return max(1, int(round(float(n) * n_features)))

    def _get_support_mask(self):
        check_is_fitted(self)
        mask = np.zeros(self.n_features_in_, dtype=bool)
        mask[self.channels_] = True
        return mask

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        return tags
