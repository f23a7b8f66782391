import numpy as np
import pytest

from earlin_sklearn import metrics


def test_known_values():
    r = metrics.ood_report([3.0, 2.0, 1.5], [0.0, 1.0, 2.5])
    assert r["auroc"] == pytest.approx(7 / 9)
    assert r["fpr_at_95tpr"] == pytest.approx(1 / 3)  # threshold 1.5 lets 2.5 through
    assert r["tnr_at_95tpr"] == pytest.approx(2 / 3)
    assert r["detection_accuracy"] == pytest.approx(5 / 6)  # threshold 1.5 or 2: 0.5 * (1 + 2/3)


def test_perfect_and_reversed_separation():
    id_, ood = np.arange(100) + 100.0, np.arange(100) * 1.0
    assert metrics.auroc(id_, ood) == 1.0 and metrics.tnr_at_tpr(id_, ood) == 1.0
    assert metrics.aupr_in(id_, ood) == 1.0 and metrics.aupr_out(id_, ood) == 1.0
    assert metrics.auroc(ood, id_) == 0.0 and metrics.tnr_at_tpr(ood, id_) == 0.0


def test_id_is_the_positive_class():
    id_, ood = [5.0, 6.0, 7.0, 8.0], [1.0]
    # ID positive: few positives rank low -> AUPR-in high; OOD positive needs negated scores
    assert metrics.aupr_in(id_, ood) == 1.0 and metrics.aupr_out(id_, ood) == 1.0


@pytest.mark.parametrize("bad", [([], [1.0]), ([1.0], [np.nan])])
def test_bad_scores(bad):
    with pytest.raises(ValueError):
        metrics.auroc(*bad)
