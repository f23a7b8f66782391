"""The decision rule shared by every detector: a threshold on ``score_samples`` set from ID data only."""

import warnings
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ._typing import Images
from .exceptions import EarlinWarning

_Estimator = TypeVar("_Estimator", bound="ThresholdMixin")

# fewer expected rejections than this and a calibrated threshold rests on a handful of images
MIN_CALIBRATION_REJECTIONS = 5


def n_rejected(n, target_tpr):
    """How many of ``n`` ID scores a threshold at ``target_tpr`` puts below it: ``floor(n * (1 - target_tpr))``."""
    return int(np.floor(n * (1.0 - target_tpr) + 1e-9))


def offset_for_tpr(scores, target_tpr):
    """Threshold that accepts (score >= threshold) at least ``target_tpr`` of ``scores``.

    It lies halfway between the highest rejected and the lowest accepted
    training score rather than on a training score, so float rounding of
    the order of 1e-7 (float32 features computed in another batch size, or on
    the edge device) cannot flip a training sample's decision.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n_reject = n_rejected(s.size, target_tpr)
    if n_reject == 0:
        return float(s[0] - max(1e-9, 1e-6 * abs(s[0])))
    if n_reject >= s.size:  # a target below 1/n accepts no training sample
        return float(s[-1] + max(1e-9, 1e-6 * abs(s[-1])))
    return float(0.5 * (s[n_reject - 1] + s[n_reject]))


def calibration_scores(scores, owner, target_tpr=None):
    """The scores of a user's held-out ID data as float64, refused when empty or non-finite, with a warning when
    too few of them would fall below a threshold at ``target_tpr`` for it to be stable (None: no warning)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError(f"{owner}.calibrate_threshold: X has no samples.")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{owner}.calibrate_threshold: {int(np.sum(~np.isfinite(scores)))} of the {scores.size} "
                         "calibration samples give a non-finite score; calibrate on finite ID images.")
    if target_tpr is None:
        return scores
    expected = scores.size * (1.0 - target_tpr)
    if target_tpr < 1.0 and expected < MIN_CALIBRATION_REJECTIONS:
        warnings.warn(f"{owner}.calibrate_threshold: {scores.size} samples at target_tpr={target_tpr:g} put the "
                      f"threshold between the {int(np.floor(expected + 1e-9)) or 'no'} lowest scores and the rest; "
                      f"use at least {int(np.ceil(MIN_CALIBRATION_REJECTIONS / (1.0 - target_tpr)))} samples for a "
                      "stable threshold.", EarlinWarning, stacklevel=3)
    return scores


class ThresholdMixin:
    """``decision_function`` and ``predict`` from ``score_samples`` and ``offset_`` (set by ``fit``)."""

    if TYPE_CHECKING:  # what the estimators that use the mixin define
        target_tpr: float
        offset_: float

        def score_samples(self, X: Images) -> np.ndarray: ...

    def calibrate_threshold(self: _Estimator, X: Images) -> _Estimator:
        """Set the threshold again, from ID data that the fit did not use.

        ``fit`` sets ``offset_`` from the training data. When the backbone was
        trained on those same images, scores that read its logits (energy,
        MSP, max logit) are over-confident on them, and the threshold then
        rejects more than ``1 - target_tpr`` of new ID images. Held-out ID
        images (a validation split the backbone never saw, or the first
        images of a deployment known to be ID) give a threshold that holds:
        afterwards ``offset_`` accepts ``target_tpr`` of ``X``. No OOD data is
        needed. Everything that reads the threshold (``predict``,
        ``decision_function``, ``export_split``, saving) reads the new one; a
        later ``fit`` or ``partial_fit`` sets it from the training data again.

        Parameters
        ----------
        X : the ID inputs that ``score_samples`` takes
            At least ``5 / (1 - target_tpr)`` samples (100 at 95%) for a stable
            threshold; fewer give a warning.

        Returns
        -------
        self : object

        Examples
        --------
        >>> import numpy as np
        >>> from earlin_sklearn import DistanceDetector
        >>> rng = np.random.default_rng(0)
        >>> det = DistanceDetector().fit(rng.normal(size=(200, 4)))
        >>> X_val = rng.normal(size=(400, 4))
        >>> float(np.mean(det.calibrate_threshold(X_val).predict(X_val) == 1))
        0.95
        """
        check_is_fitted(self)
        scores = calibration_scores(self.score_samples(X), type(self).__name__, self.target_tpr)
        self.offset_ = offset_for_tpr(scores, self.target_tpr)
        return self

    def decision_function(self, X: Images) -> np.ndarray:
        """``score_samples(X) - offset_``: negative for OOD.

        Parameters
        ----------
        X : the inputs that ``score_samples`` takes

        Returns
        -------
        decision : ndarray of shape (n_samples,)
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X: Images) -> np.ndarray:
        """+1 for in-distribution (upload), -1 for out-of-distribution (reject).

        Parameters
        ----------
        X : the inputs that ``score_samples`` takes

        Returns
        -------
        labels : ndarray of shape (n_samples,), int
        """
        return np.where(self.decision_function(X) >= 0, 1, -1)
