import numpy as np
import pytest

from earlin_sklearn import make_pseudo_ood, make_pseudo_ood_scorer
from earlin_sklearn._scorers import OODScorer

from .conftest import make_images


@pytest.mark.parametrize("kind", ["shuffle", "blur", "noise"])
def test_pseudo_ood_keeps_shape_and_is_seeded(kind):
    X, _ = make_images(10)
    a, b = make_pseudo_ood(X, kind, random_state=3), make_pseudo_ood(X, kind, random_state=3)
    assert a.shape == X.shape and a.dtype == X.dtype
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, X)


def test_shuffle_keeps_each_images_pixel_values():
    X, _ = make_images(4)
    S = make_pseudo_ood(X, "shuffle", random_state=0)
    np.testing.assert_allclose(np.sort(S.reshape(4, 3, -1), axis=2), np.sort(X.reshape(4, 3, -1), axis=2))


def test_blur_removes_detail():
    X, _ = make_images(4)
    B = make_pseudo_ood(X, "blur")
    assert np.abs(np.diff(B, axis=3)).mean() < 0.3 * np.abs(np.diff(X, axis=3)).mean()
    with pytest.raises(ValueError, match="blur"):
        make_pseudo_ood(X.reshape(4, -1), "blur")


def test_scorers_reject_bad_kinds_and_pickle():
    import pickle

    with pytest.raises(ValueError, match="kinds"):
        make_pseudo_ood_scorer(kinds=("rotate",))
    assert pickle.loads(pickle.dumps(make_pseudo_ood_scorer())).kinds == ("shuffle", "blur", "noise")
    assert "X_ood of shape (3, 2)" in repr(OODScorer(np.zeros((3, 2))))
