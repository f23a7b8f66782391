"""Property-based tests (hypothesis) of the array-level steps: order invariance, a monotone threshold,
ID acceptance near the target."""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from earlin_sklearn import ChannelSelector, DistanceDetector  # noqa: E402
from earlin_sklearn._threshold import offset_for_tpr  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def gaussian_classes(seed, n_per_class, n_classes, dim):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, dim))
    scales = rng.uniform(0.5, 2.0, dim)
    X = np.concatenate([c + scales * rng.standard_normal((n_per_class, dim)) for c in centres])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return X, y


@SETTINGS
@given(seed=st.integers(0, 10_000), n_classes=st.integers(1, 4), dim=st.integers(2, 12),
       metric=st.sampled_from(["mahalanobis", "euclidean"]))
def test_scores_do_not_depend_on_the_order_of_the_training_rows(seed, n_classes, dim, metric):
    X, y = gaussian_classes(seed, 30, n_classes, dim)
    order = np.random.default_rng(seed + 1).permutation(len(X))
    a = DistanceDetector(metric=metric).fit(X, y)
    b = DistanceDetector(metric=metric).fit(X[order], y[order])
    X_new, _ = gaussian_classes(seed + 2, 10, n_classes, dim)
    np.testing.assert_allclose(a.score_samples(X_new), b.score_samples(X_new), rtol=1e-9, atol=1e-9)


@SETTINGS
@given(seed=st.integers(0, 10_000), dim=st.integers(4, 20), keep=st.floats(0.1, 1.0))
def test_channel_selection_does_not_depend_on_row_order(seed, dim, keep):
    X, y = gaussian_classes(seed, 25, 3, dim)
    order = np.random.default_rng(seed).permutation(len(X))
    a = ChannelSelector(n_channels=keep, criterion="fisher").fit(X, y)
    b = ChannelSelector(n_channels=keep, criterion="fisher").fit(X[order], y[order])
    np.testing.assert_array_equal(np.sort(a.channels_), np.sort(b.channels_))


@SETTINGS
@given(scores=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300),
       t1=st.floats(1e-6, 1.0), t2=st.floats(1e-6, 1.0))
def test_the_threshold_is_monotone_in_target_tpr_and_meets_it(scores, t1, t2):
    lo, hi = sorted((t1, t2))
    s = np.asarray(scores)
    # a higher target never raises the threshold, and the training acceptance reaches the target
    assert offset_for_tpr(s, hi) <= offset_for_tpr(s, lo)
    for t in (lo, hi):
        assert np.mean(s >= offset_for_tpr(s, t)) >= t - 1e-9 or t * s.size < 1


@SETTINGS
@given(seed=st.integers(0, 10_000), dim=st.integers(2, 8), target=st.sampled_from([0.8, 0.9, 0.95]))
def test_new_id_data_is_accepted_near_the_target(seed, dim, target):
    X, y = gaussian_classes(seed, 1900, 2, dim)
    train = np.r_[0:400, 1900:2300]  # 400 rows of each class to fit on, 1500 of each, unseen, to check
    new = np.setdiff1d(np.arange(len(X)), train)
    det = DistanceDetector(target_tpr=target).fit(X[train], y[train])
    accepted = np.mean(det.predict(X[new]) == 1)
    assert abs(accepted - target) < 0.04, accepted
