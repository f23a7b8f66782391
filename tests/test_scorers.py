import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator

from earlin_sklearn import (DistanceDetector, ShallowFeatureOODDetector, held_out_class_auroc, make_pseudo_ood,
                            make_pseudo_ood_scorer)
from earlin_sklearn._scorers import OODScorer

from .conftest import make_images, make_tiny_cnn


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


_FITS = []


class _Spy(BaseEstimator):
    """Records the labels it is fitted on and the rows it scores; scores = minus the first feature."""

    def fit(self, X, y):
        _FITS.append({"fit_rows": set(np.asarray(X)[:, 1].astype(int)), "fit_classes": set(np.unique(y))})
        return self

    def score_samples(self, X):
        _FITS[-1]["val_rows"] = set(np.asarray(X)[:, 1].astype(int))
        return -np.asarray(X)[:, 0]


def test_held_out_class_auroc_leaves_each_class_out_once_and_scores_unseen_rows():
    y = np.repeat(np.arange(6), 20)
    X = np.c_[y, np.arange(len(y))].astype(float)  # column 1: the row's index
    _FITS.clear()
    spy = _Spy()
    aurocs = held_out_class_auroc(spy, X, y, n_folds=3, random_state=1)
    assert aurocs.shape == (3,) and np.all((aurocs >= 0) & (aurocs <= 1))
    assert not hasattr(spy, "__sklearn_is_fitted__") and len(_FITS) == 3  # clones were fitted
    val = _FITS[0]["val_rows"]
    assert len(val) == 24 and all(f["val_rows"] == val for f in _FITS)  # one stratified split, 20% per class
    left_out = [set(range(6)) - f["fit_classes"] for f in _FITS]
    assert [len(g) for g in left_out] == [2, 2, 2] and set().union(*left_out) == set(range(6))
    for f in _FITS:
        assert not f["fit_rows"] & val  # validation rows are never fitted on
        assert f["fit_rows"] == {i for i in range(len(y)) if y[i] in f["fit_classes"]} - val
    np.testing.assert_array_equal(aurocs, held_out_class_auroc(spy, X, y, n_folds=3, random_state=1))


def test_held_out_class_auroc_on_images_with_a_detector():
    X, y = make_images(90, n_classes=3)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), layer="stem", threshold_cv=None)
    aurocs = held_out_class_auroc(det, torch.from_numpy(X), y, n_folds=3)
    assert aurocs.shape == (3,) and np.all(np.isfinite(aurocs))
    assert not hasattr(det, "pipeline_")
    # the classes of make_images differ in their pattern: a class never seen scores lower
    assert aurocs.mean() > 0.9


@pytest.mark.parametrize("args, error, match", [
    ((np.zeros((10, 2)), np.zeros(10)), ValueError, "at least 2 classes"),
    ((np.zeros((10, 2)), np.arange(10) % 2, 3), ValueError, "n_folds"),
    ((np.zeros((10, 2)), np.arange(9) % 2), ValueError, "one label per input"),
    ((np.zeros((10, 2)), np.arange(10) % 2, 2, 1.5), ValueError, "val_fraction"),
    (([[0.0, 1.0]] * 10, np.arange(10) % 2), TypeError, "array or tensor"),
])
def test_held_out_class_auroc_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        held_out_class_auroc(DistanceDetector(), *args)


def test_held_out_class_auroc_takes_any_label_type_alike():
    rng = np.random.default_rng(0)
    names = np.repeat(np.array(["car", "cat", "dog", "ship"]), 30)
    codes = np.unique(names, return_inverse=True)[1]
    X = rng.normal(size=(120, 3)) + 3 * np.eye(4, 3)[codes]
    det = DistanceDetector(class_conditional=True)
    by_name = held_out_class_auroc(det, X, names, n_folds=2)
    np.testing.assert_array_equal(by_name, held_out_class_auroc(det, X, codes, n_folds=2))
    np.testing.assert_array_equal(by_name, held_out_class_auroc(det, torch.from_numpy(X), torch.from_numpy(codes),
                                                                n_folds=2))


def test_yeo_johnson_newton_lambdas_match_scikit_learn():
    from sklearn.preprocessing import PowerTransformer

    from earlin_sklearn._yeo_johnson import yeo_johnson_lambdas

    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(size=3000), rng.normal(size=3000) ** 2, -np.abs(rng.normal(size=3000)) ** 3,
                         rng.exponential(size=3000) * 50, rng.lognormal(size=3000), np.full(3000, 3.0),
                         np.zeros(3000), rng.standard_t(3, size=3000), rng.uniform(size=3000)])
    expected = PowerTransformer().fit(X).lambdas_
    np.testing.assert_allclose(yeo_johnson_lambdas(X), expected, atol=1e-5)


def test_power_transform_equals_scikit_learn_and_marks_overflowed_rows():
    from sklearn.preprocessing import PowerTransformer

    from earlin_sklearn._passes import fit_power_transform, power_transform

    rng = np.random.default_rng(1)
    F = np.column_stack([rng.normal(size=500), rng.lognormal(size=500), -rng.exponential(size=500) * 30,
                         rng.standard_t(3, size=500), np.zeros(500)])
    gaussianize = fit_power_transform(F)
    lambdas = gaussianize.lambdas_.copy()
    lambdas[0], lambdas[2] = 0.0, 2.0  # the logarithm branches, on both sides of zero
    gaussianize.lambdas_ = lambdas
    new = np.vstack([F[:50], -F[50:100], rng.normal(size=(20, 5)) * 1e-9])
    with np.errstate(over="ignore", invalid="ignore"):
        expected = PowerTransformer.transform(gaussianize, new)
    np.testing.assert_allclose(power_transform(gaussianize, new), expected, rtol=1e-12, atol=1e-12)
    far = new[:3].copy()
    assert gaussianize.lambdas_[1] < 0  # a log-normal column: below zero, (1 - x) ** (2 - lambda) overflows
    far[1, 1] = -1e300
    G = power_transform(gaussianize, far)
    assert np.isinf(G[1]).all() and np.isfinite(G[[0, 2]]).all()
    with pytest.raises(ValueError, match="overflowed"):
        power_transform(gaussianize, far, owner="fit")


def test_pseudo_ood_sets_one_per_image_deals_every_image_once():
    from earlin_sklearn._scorers import pseudo_ood_sets

    X = np.random.default_rng(0).random((31, 3, 8, 8), dtype=np.float32)
    sets = pseudo_ood_sets(X, per_image="one")
    assert [k for k, _ in sets] == ["shuffle", "blur", "noise"]
    assert sum(len(P) for _, P in sets) == 31
    with pytest.raises(ValueError, match="per_image"):
        pseudo_ood_sets(X, per_image="two")
