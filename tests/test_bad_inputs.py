"""Odd inputs as users send them: a clear error in the estimator's own terms, or a documented conversion;
never a silent wrong answer."""

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from earlin_sklearn import (BackboneFeatures, DistanceDetector, ShallowFeatureOODDetector, collaborative_cost,
                            recommend_layer)
from earlin_sklearn._threshold import offset_for_tpr
from earlin_sklearn.exceptions import EarlinWarning

from .conftest import AnyInputNet, make_images, make_tiny_cnn


@pytest.fixture(scope="module")
def fitted():
    X, y = make_images(60)
    return ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y), X


def test_one_sample_per_class_never_accepts_everything():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5))
    with pytest.warns(UserWarning, match="single sample"):
        det = DistanceDetector().fit(X, np.arange(40))  # labels that are sample ids
    assert det.classes_ is None
    far = X[:5] + 50
    assert (det.predict(far) == -1).all() and np.ptp(det.score_samples(X)) > 0
    with pytest.raises(ValueError, match="single sample"):
        DistanceDetector(class_conditional=True).fit(X, np.arange(40))


def test_a_dataset_yielding_indices_as_labels_is_not_accept_all():
    X, _ = make_images(40)

    class Indexed(Dataset):
        def __len__(self):
            return len(X)

        def __getitem__(self, i):
            return torch.from_numpy(X[i]), i

    with pytest.warns(UserWarning, match="single sample"):
        det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(Indexed())
    assert (det.predict(np.full((3, 3, 12, 12), 40.0, dtype=np.float32)) == -1).all()


def test_too_few_or_identical_samples_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        DistanceDetector().fit(np.ones((1, 3)))
    with pytest.raises(ValueError, match="do not vary"):
        DistanceDetector().fit(np.ones((10, 3)))


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 3, 48, 48)])
def test_predict_checks_the_image_size(fitted, shape):
    det, _ = fitted
    with pytest.raises(ValueError, match=r"fitted on images of shape \(3, 12, 12\)"):
        det.predict(np.zeros(shape, dtype=np.float32))
    with pytest.raises(ValueError, match=r"fitted on images of shape \(3, 12, 12\)"):
        det.predict(DataLoader(TensorDataset(torch.zeros(shape)), batch_size=2))


def test_uint8_batches_from_a_loader_warn(fitted):
    det, X = fitted
    loader = DataLoader((X[:4] * 50).clip(0, 255).astype(np.uint8), batch_size=2)
    with pytest.warns(UserWarning, match="uint8"):
        det.score_samples(loader)


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinity")])
def test_non_finite_loader_batches_are_named(fitted, value, word):
    det, X = fitted
    bad = X[:4].copy()
    bad[1, 0, 0, 0] = value
    with pytest.raises(ValueError, match=f"ShallowFeatureOODDetector got images containing {word}"):
        det.score_samples(DataLoader(bad, batch_size=2))


def test_empty_loader_is_a_clear_error():
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 12, 12)), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(empty)


@pytest.mark.parametrize("shape", [(4, 12), (4, 12, 12), (4, 1, 3, 12, 12)])
def test_wrong_dimensions_are_explained(shape):
    with pytest.raises(ValueError, match=r"could not run on images|N, C, H, W"):
        BackboneFeatures(make_tiny_cnn(), "layer1", device="cpu").fit(np.zeros(shape, dtype=np.float32))


def test_channels_last_gets_a_hint():
    with pytest.raises(ValueError, match="channels-last"):
        BackboneFeatures(make_tiny_cnn(), "layer1", device="cpu").fit(np.zeros((4, 12, 12, 3), dtype=np.float32))


def test_a_model_whose_first_conv_is_not_its_first_layer_is_accepted():
    X = np.random.default_rng(0).standard_normal((20, 5, 4, 4)).astype(np.float32)
    feats = BackboneFeatures(AnyInputNet(), "act", device="cpu").fit_transform(X)
    assert feats.shape == (20, 12)


def test_string_labels_from_a_dataset():
    X, y = make_images(60)
    names = np.array(["cat", "dog", "ship"])[y]

    class Named(Dataset):
        def __len__(self):
            return len(X)

        def __getitem__(self, i):
            return torch.from_numpy(X[i]), names[i]

    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(Named())
    assert list(det.pipeline_["distance"].classes_) == ["cat", "dog", "ship"]


def test_tiny_target_tpr():
    s = np.arange(10.0)
    assert offset_for_tpr(s, 1e-12) > s.max()  # below 1/n: accepts nothing, no IndexError
    assert np.sum(s >= offset_for_tpr(s, 1e-3)) == 1  # at least the target: one sample
    X = np.random.default_rng(0).standard_normal((50, 3))
    det = DistanceDetector(target_tpr=1e-12, threshold_cv=None).fit(X)
    assert (det.predict(X) == -1).all()


def test_cost_payload_typo_is_a_parameter_error():
    from sklearn.utils._param_validation import InvalidParameterError

    from earlin_sklearn import SplitCost
    cost = SplitCost(edge_params=1, cloud_params=1, detector_values=1, edge_flops=1, detector_flops=1,
                     cloud_flops=1, full_flops=3, raw_uint8_bytes=1, raw_float32_bytes=4, payload_float32_bytes=4,
                     payload_float16_bytes=2, payload_int8_bytes=9, payload_shapes=[[1]], n_eval=1)
    with pytest.raises(InvalidParameterError, match="payload"):
        collaborative_cost(cost, 0.5, 0.95, 0.9, payload="bfloat16")


def test_recommend_layer_refuses_a_typo():
    X, y = make_images(30)
    with pytest.raises(ValueError, match="layr1"):
        recommend_layer(make_tiny_cnn(), X, y, layers=["layr1"])


@pytest.mark.parametrize("make, message", [
    (lambda X: X.transpose(0, 2, 3, 1), r"ShallowFeatureOODDetector is expecting 3 .*channels-last.*transpose"),
    (lambda X: X[0], r"ShallowFeatureOODDetector takes a batch of images .* X\[None\]"),
    (lambda X: X[:, 0], r"ShallowFeatureOODDetector takes images of shape \(N, 3, 12, 12\); got a 3-D array"),
    (lambda X: X[:, None], r"ShallowFeatureOODDetector takes images .* got a 5-D array"),
    (lambda X: X.reshape(len(X), -1), r"got a 2-D array"),
], ids=["channels-last", "one image", "3-D", "5-D", "flat"])
def test_arrays_of_another_layout_are_named_in_the_composites_terms(fitted, make, message):
    det, X = fitted
    for method in (det.predict, det.score_samples, det.decision_function):
        with pytest.raises(ValueError, match=message):
            method(make(X[:4]))
    # a DataLoader of such batches is refused the same way, batch by batch
    if make(X[:4]).ndim != 3:
        with pytest.raises(ValueError, match="ShallowFeatureOODDetector"):
            det.score_samples(DataLoader(make(X[:4]), batch_size=2))


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinity")])
def test_non_finite_arrays_are_named_without_unrelated_advice(fitted, value, word):
    det, X = fitted
    bad = X[:4].copy()
    bad[1, 0, 0, 0] = value
    for call in (det.predict, det.score_samples):
        with pytest.raises(ValueError, match=f"ShallowFeatureOODDetector got images containing {word}") as err:
            call(bad)
        assert "HistGradientBoosting" not in str(err.value)  # scikit-learn's advice for tabular data
    assert det.predict(X[:4] * 1e3).shape == (4,)  # large but finite pixels are the model's business


def test_fitting_on_a_handful_of_images_warns():
    X = np.random.default_rng(0).standard_normal((12, 3, 12, 12)).astype(np.float32)
    with pytest.warns(EarlinWarning, match="fitted on 3 ID images: at target_tpr=0.95 the threshold cannot reject"):
        ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error", EarlinWarning)
        ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu", target_tpr=0.9).fit(X[:10])  # 1 rejected
