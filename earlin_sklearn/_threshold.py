"""The decision rule shared by every detector: a threshold on ``score_samples`` set from ID data only."""

import numpy as np


def offset_for_tpr(scores, target_tpr):
    """Threshold that accepts (score >= threshold) at least ``target_tpr`` of ``scores``.

    It lies halfway between the highest rejected and the lowest accepted
    training score rather than on a training score, so float rounding of
    the order of 1e-7 (float32 features computed in another batch size, or on
    the edge device) cannot flip a training sample's decision.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n_reject = int(np.floor(s.size * (1.0 - target_tpr) + 1e-9))
    if n_reject == 0:
        return float(s[0] - max(1e-9, 1e-6 * abs(s[0])))
    if n_reject >= s.size:  # a target below 1/n accepts no training sample
        return float(s[-1] + max(1e-9, 1e-6 * abs(s[-1])))
    return float(0.5 * (s[n_reject - 1] + s[n_reject]))


class ThresholdMixin:
    """``decision_function`` and ``predict`` from ``score_samples`` and ``offset_`` (set by ``fit``)."""

    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for OOD.

        Parameters
        ----------
        X : the inputs that ``score_samples`` takes

        Returns
        -------
        decision : ndarray of shape (n_samples,)
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 for in-distribution (upload), -1 for out-of-distribution (reject).

        Parameters
        ----------
        X : the inputs that ``score_samples`` takes

        Returns
        -------
        labels : ndarray of shape (n_samples,), int
        """
        return np.where(self.decision_function(X) >= 0, 1, -1)
