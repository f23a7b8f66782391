import numpy as np
import pytest

from earlin_sklearn import ChannelSelector


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    X = rng.normal(size=(120, 6))
    X[:, 2] += 3.0 * y  # separates the classes, small spread
    X[:, 4] *= 10.0  # large variance, no class information
    return X, y


def test_fisher_picks_class_separating_channels(data):
    X, y = data
    sel = ChannelSelector(n_channels=1, criterion="fisher").fit(X, y)
    assert sel.channels_.tolist() == [2]
    assert sel.transform(X).shape == (120, 1)


def test_variance_needs_no_labels(data):
    X, _ = data
    sel = ChannelSelector(n_channels=2, criterion="variance").fit(X)
    assert sel.channels_.tolist() == [2, 4] and sel.criterion_ == "variance"


def test_auto_uses_labels_when_given(data):
    X, y = data
    assert ChannelSelector(n_channels=1).fit(X, y).criterion_ == "fisher"
    assert ChannelSelector(n_channels=1).fit(X).criterion_ == "variance"
    assert ChannelSelector(n_channels=1).fit(X, np.zeros(120)).criterion_ == "variance"


@pytest.mark.parametrize("n,expected", [(0.5, 3), (1.0, 6), (0.01, 1), ("all", 6), (4, 4)])
def test_n_channels_as_count_fraction_or_all(data, n, expected):
    assert ChannelSelector(n_channels=n).fit(data[0]).channels_.size == expected


def test_too_many_channels_warns_and_keeps_all(data):
    with pytest.warns(UserWarning, match="all are kept"):
        assert ChannelSelector(n_channels=50).fit(data[0]).channels_.size == 6


def test_fisher_without_labels_is_an_error(data):
    with pytest.raises(ValueError, match="needs class labels"):
        ChannelSelector(criterion="fisher").fit(data[0])


@pytest.mark.parametrize("bad", [0, -1, 1.5, "half"])
def test_bad_n_channels(data, bad):
    with pytest.raises(ValueError, match="n_channels"):
        ChannelSelector(n_channels=bad).fit(data[0])


def test_auto_keeps_every_column_but_still_scores_them(data):
    X, y = data
    with_labels = ChannelSelector().fit(X, y)
    assert with_labels.channels_.size == 6 and with_labels.criterion_ == "fisher"
    assert with_labels.scores_.shape == (6,) and np.ptp(with_labels.scores_) > 0
    assert ChannelSelector().fit(X).channels_.size == 6
