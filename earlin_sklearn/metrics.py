"""OOD detection metrics.

Convention (as in the ODIN and Mahalanobis papers): in-distribution (ID) is the
**positive** class and scores are "higher = more ID", like
:meth:`ShallowFeatureOODDetector.score_samples`. Every function takes the
scores of ID inputs and of OOD inputs and returns a fraction in [0, 1].
"""

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def _labels_and_scores(score_id, score_ood):
    score_id = np.asarray(score_id, dtype=np.float64).reshape(-1)
    score_ood = np.asarray(score_ood, dtype=np.float64).reshape(-1)
    if score_id.size == 0 or score_ood.size == 0:
        raise ValueError("Need at least one ID score and one OOD score.")
    if not (np.all(np.isfinite(score_id)) and np.all(np.isfinite(score_ood))):
        raise ValueError("Scores must be finite.")
    y = np.r_[np.ones(score_id.size), np.zeros(score_ood.size)]
    return y, np.r_[score_id, score_ood]


def auroc(score_id: npt.ArrayLike, score_ood: npt.ArrayLike) -> float:
    """Area under the ROC curve, ID positive: the probability that a random ID
    input scores higher than a random OOD input.

    Parameters
    ----------
    score_id : array-like of shape (n_id,)
        Scores of ID inputs (higher = more in-distribution).
    score_ood : array-like of shape (n_ood,)
        Scores of OOD inputs.

    Returns
    -------
    auroc : float
        In [0, 1].

    Examples
    --------
    >>> from earlin_sklearn.metrics import auroc
    >>> round(auroc([3.0, 2.0, 1.5], [0.0, 1.0, 2.5]), 3)
    0.778
    """
    y, s = _labels_and_scores(score_id, score_ood)
    return float(roc_auc_score(y, s))


def aupr_in(score_id: npt.ArrayLike, score_ood: npt.ArrayLike) -> float:
    """Area under the precision-recall curve with ID as the positive class.

    Parameters
    ----------
    score_id : array-like of shape (n_id,)
        Scores of ID inputs (higher = more in-distribution).
    score_ood : array-like of shape (n_ood,)
        Scores of OOD inputs.

    Returns
    -------
    aupr : float
        In [0, 1].

    Examples
    --------
    >>> from earlin_sklearn.metrics import aupr_in
    >>> round(aupr_in([3.0, 2.0, 1.5], [0.0, 1.0, 2.5]), 3)
    0.806
    """
    y, s = _labels_and_scores(score_id, score_ood)
    return float(average_precision_score(y, s))


def aupr_out(score_id: npt.ArrayLike, score_ood: npt.ArrayLike) -> float:
    """Area under the precision-recall curve with OOD as the positive class
    (scores negated, so that higher = more OOD).

    Parameters
    ----------
    score_id : array-like of shape (n_id,)
        Scores of ID inputs (higher = more in-distribution).
    score_ood : array-like of shape (n_ood,)
        Scores of OOD inputs.

    Returns
    -------
    aupr : float
        In [0, 1].

    Examples
    --------
    >>> from earlin_sklearn.metrics import aupr_out
    >>> round(aupr_out([3.0, 2.0, 1.5], [0.0, 1.0, 2.5]), 3)
    0.867
    """
    y, s = _labels_and_scores(score_id, score_ood)
    return float(average_precision_score(1 - y, -s))


def fpr_at_tpr(score_id: npt.ArrayLike, score_ood: npt.ArrayLike, tpr: float = 0.95) -> float:
    """Fraction of OOD inputs accepted as ID at the threshold that accepts at
    least ``tpr`` of the ID inputs.

    Parameters
    ----------
    score_id : array-like of shape (n_id,)
        Scores of ID inputs (higher = more in-distribution).
    score_ood : array-like of shape (n_ood,)
        Scores of OOD inputs.
    tpr : float, default=0.95
        Fraction of ID inputs the threshold accepts.

    Returns
    -------
    fpr : float
        In [0, 1].

    Examples
    --------
    >>> from earlin_sklearn.metrics import fpr_at_tpr
    >>> round(fpr_at_tpr([3.0, 2.0, 1.5], [0.0, 1.0, 2.5]), 3)
    0.333
    """
    y, s = _labels_and_scores(score_id, score_ood)
    fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    return float(fprs[np.searchsorted(tprs, tpr, side="left")])


def tnr_at_tpr(score_id: npt.ArrayLike, score_ood: npt.ArrayLike, tpr: float = 0.95) -> float:
    """Fraction of OOD inputs rejected at the threshold that accepts at least
    ``tpr`` of the ID inputs: ``1 - fpr_at_tpr``.

    Parameters
    ----------
    score_id : array-like of shape (n_id,)
        Scores of ID inputs (higher = more in-distribution).
    score_ood : array-like of shape (n_ood,)
        Scores of OOD inputs.
    tpr : float, default=0.95
        Fraction of ID inputs the threshold accepts.

    Returns
    -------
    tnr : float
        In [0, 1].

    Examples
    --------
    >>> from earlin_sklearn.metrics import tnr_at_tpr
    >>> round(tnr_at_tpr([3.0, 2.0, 1.5], [0.0, 1.0, 2.5]), 3)
    0.667
    """
    return 1.0 - fpr_at_tpr(score_id, score_ood, tpr)


def detection_accuracy(score_id: npt.ArrayLike, score_ood: npt.ArrayLike) -> float:
    """Best accuracy over thresholds with ID and OOD weighted equally:
    ``max_t 0.5 * (TPR(t) + TNR(t))`` (Liang et al. 2018).

    Parameters
    ----------
    score_id : array-like of shape (n_id,)
        Scores of ID inputs (higher = more in-distribution).
    score_ood : array-like of shape (n_ood,)
        Scores of OOD inputs.

    Returns
    -------
    accuracy : float
        In [0, 1].

    Examples
    --------
    >>> from earlin_sklearn.metrics import detection_accuracy
    >>> round(detection_accuracy([3.0, 2.0, 1.5], [0.0, 1.0, 2.5]), 3)
    0.833
    """
    y, s = _labels_and_scores(score_id, score_ood)
    fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    return float(np.max(0.5 * (tprs + 1.0 - fprs)))


def ood_report(score_id: npt.ArrayLike, score_ood: npt.ArrayLike, tpr: float = 0.95) -> dict:
    """All the metrics above as a dict (fractions in [0, 1]).

    Parameters
    ----------
    score_id : array-like of shape (n_id,)
        Scores of ID inputs (higher = more in-distribution).
    score_ood : array-like of shape (n_ood,)
        Scores of OOD inputs.
    tpr : float, default=0.95
        Fraction of ID inputs the threshold of the TNR/FPR entries accepts.

    Returns
    -------
    report : dict
        ``auroc``, ``tnr_at_95tpr``, ``fpr_at_95tpr`` (named after ``tpr``),
        ``aupr_in``, ``aupr_out`` and ``detection_accuracy``.

    Examples
    --------
    >>> from earlin_sklearn.metrics import ood_report
    >>> r = ood_report([3.0, 2.0, 1.5], [0.0, 1.0, 2.5])
    >>> round(r["auroc"], 3), round(r["tnr_at_95tpr"], 3)
    (0.778, 0.667)
    """
    fpr = fpr_at_tpr(score_id, score_ood, tpr)
    key = f"{round(tpr * 100)}tpr"
    return {
        "auroc": auroc(score_id, score_ood),
        f"tnr_at_{key}": 1.0 - fpr,
        f"fpr_at_{key}": fpr,
        "aupr_in": aupr_in(score_id, score_ood),
        "aupr_out": aupr_out(score_id, score_ood),
        "detection_accuracy": detection_accuracy(score_id, score_ood),
    }
