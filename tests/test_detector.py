import pickle

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, TensorDataset

from earlin_sklearn import (
    BackboneFeatures,
    ChannelSelector,
    DistanceDetector,
    ShallowFeatureOODDetector,
    make_ood_scorer,
    make_pseudo_ood_scorer,
)
from earlin_sklearn.metrics import auroc

from .conftest import make_images, make_tiny_cnn


def ood_images(n=40, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(-2, 2, size=(n, 3, 12, 12)).astype(np.float32)


def test_detects_ood_and_accepts_id(tiny_cnn, images):
    X, y = images
    det = ShallowFeatureOODDetector(tiny_cnn, "layer1", device="cpu").fit(X, y)
    X_test, _ = make_images(60, seed=5)
    s_id, s_ood = det.score_samples(X_test), det.score_samples(ood_images())
    assert auroc(s_id, s_ood) > 0.95
    assert np.mean(det.predict(X_test) == 1) > 0.8
    assert np.mean(det.predict(ood_images()) == -1) > 0.8
    np.testing.assert_allclose(det.decision_function(X_test), s_id - det.offset_)
    assert det.predict(X_test).dtype.kind == "i"


def test_fit_leaves_backbone_untouched(images):
    net = make_tiny_cnn().train()
    net.layer2.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.requires_grad for p in net.parameters()]
    modules = list(net.modules())
    det = ShallowFeatureOODDetector(net, "layer1", device="cpu").fit(*images)
    det.score_samples(images[0])
    assert net.training and all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == grads
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats too
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
    assert det.pipeline_["features"].module_ is not net
    assert not det.pipeline_["features"].module_.training


def test_loader_labels_equal_explicit_labels(tiny_cnn, images):
    X, y = images
    ds = TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
    from_loader = ShallowFeatureOODDetector(tiny_cnn, "layer1", device="cpu").fit(DataLoader(ds, batch_size=16))
    from_arrays = ShallowFeatureOODDetector(tiny_cnn, "layer1", device="cpu").fit(X, y)
    assert from_loader.pipeline_["distance"].classes_.tolist() == [0, 1, 2]
    np.testing.assert_allclose(from_loader.score_samples(X), from_arrays.score_samples(X), rtol=1e-6)
    np.testing.assert_allclose(from_loader.score_samples(ds), from_arrays.score_samples(X), rtol=1e-6)
    unlabelled = ShallowFeatureOODDetector(tiny_cnn, "layer1", device="cpu").fit(torch.from_numpy(X))
    assert unlabelled.pipeline_["distance"].classes_ is None


def test_steps_compose_in_a_pipeline(tiny_cnn, images):
    X, y = images
    pipe = make_pipeline(
        BackboneFeatures(tiny_cnn, "layer1", device="cpu"),
        StandardScaler(),
        ChannelSelector(n_channels=6),
        DistanceDetector(metric="euclidean"),
    ).fit(X, y)
    assert pipe.predict(X).shape == (len(X),)
    assert auroc(pipe.score_samples(X), pipe.score_samples(ood_images())) > 0.9
    det = ShallowFeatureOODDetector(tiny_cnn, "layer1", n_channels=6, device="cpu").fit(X, y)
    np.testing.assert_array_equal(det.pipeline_.predict(X), det.predict(X))


@pytest.mark.parametrize("n_jobs", [1, 2])
@pytest.mark.parametrize("scoring", ["ood", "pseudo"])
def test_grid_search(tiny_cnn, images, n_jobs, scoring):
    X, _ = images
    X5, y5 = make_images(150, n_classes=5, seed=3)
    unseen_classes = X5[y5 >= 3]  # near OOD: uniform noise would score 1.0 everywhere
    scorer = make_ood_scorer(unseen_classes) if scoring == "ood" else make_pseudo_ood_scorer()
    grid = {"layer": ["stem", "layer1"], "n_channels": [4, "all"], "metric": ["euclidean", "mahalanobis"]}
    search = GridSearchCV(
        ShallowFeatureOODDetector(tiny_cnn, "layer1", device="cpu"), grid, scoring=scorer, cv=3, n_jobs=n_jobs
    ).fit(X)
    scores = search.cv_results_["mean_test_score"]
    assert len(scores) == 8 and np.all((scores >= 0) & (scores <= 1))
    assert np.ptp(scores) > 0  # the candidates are really different
    assert search.best_estimator_.layer in ("stem", "layer1")
    assert search.best_estimator_.predict(X).shape == (len(X),)


def test_clone_and_params(tiny_cnn):
    det = ShallowFeatureOODDetector(tiny_cnn, "layer1", metric="cosine")
    twin = clone(det)
    assert twin.get_params()["metric"] == "cosine" and twin.backbone is not tiny_cnn
    twin.set_params(layer="stem", n_channels=0.5)
    assert (twin.layer, twin.n_channels) == ("stem", 0.5)


def test_joblib_round_trip_is_bit_identical(tiny_cnn, images, tmp_path):
    X, y = images
    det = ShallowFeatureOODDetector(tiny_cnn, "layer1", device="cpu").fit(X, y)
    joblib.dump(det, tmp_path / "det.joblib")
    loaded = joblib.load(tmp_path / "det.joblib")
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))
    np.testing.assert_array_equal(loaded.predict(X), det.predict(X))
    blob = pickle.dumps(det)
    assert b"_LayerTap" not in blob and b"tqdm" not in blob  # no hooks or progress bars
    assert isinstance(det.pipeline_["distance"].centroids_, np.ndarray)
    assert pickle.loads(blob).pipeline_["features"].module_.layer1._forward_hooks == {}


@pytest.mark.parametrize(
    "params,match",
    [({"layer": "nope"}, "is not a submodule"), ({"metric": "manhattan"}, "metric"), ({"target_tpr": 1.5}, "target_tpr")],
)
def test_bad_parameters(tiny_cnn, images, params, match):
    with pytest.raises(ValueError, match=match):
        ShallowFeatureOODDetector(tiny_cnn, **{"layer": "layer1", **params}).fit(images[0])


def test_unfitted_and_wrong_shape(tiny_cnn, images):
    from sklearn.exceptions import NotFittedError

    det = ShallowFeatureOODDetector(tiny_cnn, "layer1", device="cpu")
    with pytest.raises(NotFittedError):
        det.predict(images[0])
    det.fit(images[0])
    with pytest.raises(ValueError, match="features"):
        det.predict(images[0][:, :2])


def test_scores_do_not_depend_on_the_batch_size():
    # float64 backbone: batch 1 (as the edge runs) equals batch 64 to 1e-9, estimator and edge alike
    from earlin_sklearn.models import cifar_resnet

    torch.manual_seed(0)
    X = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    y = np.arange(96) % 4
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        net = cifar_resnet(20).to(dtype)
        det = ShallowFeatureOODDetector(net, "layer1", device="cpu", batch_size=64).fit(X, y)
        s64 = det.score_samples(X[:64])
        det.pipeline_["features"].batch_size = 1
        s1 = det.score_samples(X[:64])
        edge, _ = det.export_split()
        e1 = np.concatenate([edge(torch.as_tensor(X[i : i + 1]).to(dtype)).score.numpy() for i in range(64)])
        # float32: oneDNN picks its convolution kernel by batch shape; differences stay ~1e-5 of a score
        # spread of ~0.5 (docs/user_guide.rst, "Batch size and precision")
        np.testing.assert_allclose(s1, s64, rtol=0, atol=tol)
        # the edge's Yeo-Johnson is torch's pow, not NumPy's (last-bit differences, scaled by the random weights'
        # narrow features): 1e-6 of a score (2e-8 relative) where the batch size alone moves nothing
        np.testing.assert_allclose(e1, s64, rtol=0, atol=max(tol, 1e-6))


def test_features_constant_to_float32_get_the_identity_transform():
    """A feature whose ID spread is below float32 resolution keeps its values (no exponent fitted to rounding);
    a dead channel (all zeros) and ordinary features are PowerTransformer's."""
    from sklearn.preprocessing import PowerTransformer

    from earlin_sklearn._passes import FEATURE_RESOLUTION, fit_power_transform

    rng = np.random.default_rng(0)
    F = np.column_stack([rng.gamma(2.0, size=500), 3.0 + 1e-6 * rng.standard_normal(500), np.zeros(500)])
    transform, plain = fit_power_transform(F), PowerTransformer().fit(F)
    assert transform.lambdas_[1] == 1.0 and plain.lambdas_[1] != 1.0
    assert transform._scaler.scale_[1] == pytest.approx(FEATURE_RESOLUTION * 3.0, rel=1e-6)
    np.testing.assert_array_equal(transform.lambdas_[[0, 2]], plain.lambdas_[[0, 2]])
    np.testing.assert_allclose(transform.transform(F)[:, [0, 2]], plain.transform(F)[:, [0, 2]])
    assert np.abs(transform.transform(F)[:, 1]).max() < 0.1  # rounding-size wiggles stay small


def test_repr_names_the_backbone_by_its_class():
    from earlin_sklearn import BackboneFeatures
    from earlin_sklearn.baselines import LogitDetector

    net = make_tiny_cnn()
    X, y = make_images(40)
    det = ShallowFeatureOODDetector(net, "layer1", device="cpu").fit(X, y)
    for est, param in ((det, "backbone"), (BackboneFeatures(net, "layer1"), "backbone"), (LogitDetector(net), "model")):
        text = repr(est)
        assert f"{param}={type(net).__name__}(...)" in text and "Conv2d" not in text, text
    assert det.backbone is not None and isinstance(det.backbone, torch.nn.Module)  # the repr changed nothing
    assert repr(det) == f"ShallowFeatureOODDetector(backbone={type(net).__name__}(...), device='cpu', layer='layer1')"
