import numpy as np
import pytest

from earlin_sklearn import DistanceDetector
from earlin_sklearn._threshold import offset_for_tpr


@pytest.fixture
def blobs():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 300)
    X = rng.normal(size=(600, 4)) + np.where(y[:, None] == 0, -4.0, 4.0)
    return X, y


def test_class_centroids_catch_what_a_global_centroid_misses(blobs):
    X, y = blobs
    between = np.zeros((1, 4))  # the global mean, far from both classes
    assert DistanceDetector(metric="euclidean").fit(X, y).predict(between)[0] == -1
    assert DistanceDetector(metric="euclidean").fit(X).predict(between)[0] == 1
    assert DistanceDetector(class_conditional=False).fit(X, y).classes_ is None


def test_class_conditional_true_needs_labels(blobs):
    with pytest.raises(ValueError, match="needs class labels"):
        DistanceDetector(class_conditional=True).fit(blobs[0])


def test_mahalanobis_uses_the_covariance():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 2)) * [10.0, 0.1]
    det = DistanceDetector().fit(X)
    along, across = det.score_samples([[5.0, 0.0], [0.0, 0.5]])
    assert along > across  # 0.5 sd along x is closer than 5 sd along y
    euc = DistanceDetector(metric="euclidean").fit(X).score_samples([[5.0, 0.0], [0.0, 0.5]])
    assert euc[0] < euc[1]


def test_mahalanobis_never_fails_on_singular_or_tiny_data():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 3))
    X = np.hstack([a, a, np.ones((50, 1))])  # duplicated and constant columns
    scores = DistanceDetector().fit(X).score_samples(X)
    assert np.all(np.isfinite(scores))
    with pytest.warns(UserWarning, match="single sample"):  # one sample per class: global centroid
        tiny = DistanceDetector().fit(X[:2], [0, 1]).score_samples(X)
    assert np.all(np.isfinite(tiny))


def test_cosine_ignores_scale(blobs):
    X, y = blobs
    det = DistanceDetector(metric="cosine").fit(X, y)
    np.testing.assert_allclose(det.score_samples(X[:5] * 7.0), det.score_samples(X[:5]), atol=1e-12)


@pytest.mark.parametrize("tpr", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_offset_accepts_target_tpr_of_training_data(blobs, tpr):
    X, y = blobs
    det = DistanceDetector(target_tpr=tpr, threshold_cv=None).fit(X, y)
    accepted = np.mean(det.predict(X) == 1)
    assert tpr <= accepted <= tpr + 1.0 / len(X) + 1e-12
    np.testing.assert_allclose(det.decision_function(X), det.score_samples(X) - det.offset_)


def test_threshold_lies_between_training_scores():
    scores = np.array([0.0, 1.0, 2.0, 3.0])
    assert offset_for_tpr(scores, 0.75) == 0.5
    assert offset_for_tpr(scores, 1.0) < 0.0


def test_cross_fitted_threshold_holds_on_new_id_data():
    # 40 dims, 10 classes, 400 samples: in-sample distances are optimistic.
    rng = np.random.default_rng(1)
    means = rng.normal(scale=3, size=(10, 40))

    def sample(n):
        y = rng.integers(0, 10, n)
        return means[y] + rng.normal(size=(n, 40)), y

    X, y = sample(400)
    X_new, _ = sample(20000)
    in_sample = np.mean(DistanceDetector(threshold_cv=None).fit(X, y).predict(X_new) == 1)
    cross_fit = np.mean(DistanceDetector().fit(X, y).predict(X_new) == 1)
    assert in_sample < 0.93  # the bias this option exists for
    assert abs(cross_fit - 0.95) < 0.02
