"""EnergyKNNDetector (energy + KNN on the penultimate features) and the two-stage cloud stage built on it."""

import json

import joblib
import numpy as np
import pytest
import torch
from torch import nn

from earlin_sklearn import ShallowFeatureOODDetector, TwoStageDetector, load_split, save_split
from earlin_sklearn._split import trace, with_classifier_input
from earlin_sklearn.baselines import EnergyKNNDetector

from .conftest import AnyInputClassifier, make_images, make_tiny_cnn, served_records


def reference_scores(model, X_train, X, k):
    """The score by hand in NumPy: the tiny CNN's penultimate features are its pooled last stage."""
    def parts(X):
        with torch.no_grad():
            x = torch.from_numpy(X)
            z = torch.flatten(model.pool(model.layer2(model.layer1(model.stem(x)))), 1).double().numpy()
            logits = model(x).double().numpy()
        m = logits.max(1)
        return m + np.log(np.exp(logits - m[:, None]).sum(1)), z / np.linalg.norm(z, axis=1, keepdims=True)

    energy_train, bank = parts(X_train)
    energy, query = parts(X)
    d_train = np.sort(np.linalg.norm(bank[:, None] - bank[None], axis=2), axis=1)[:, k]  # [0] is itself
    d = np.sort(np.linalg.norm(query[:, None] - bank[None], axis=2), axis=1)[:, k - 1]
    e_mu, e_sd, k_mu, k_sd = energy_train.mean(), energy_train.std(), (-d_train).mean(), (-d_train).std()
    return (energy - e_mu) / e_sd + (-d - k_mu) / k_sd, (energy_train - e_mu) / e_sd + (-d_train - k_mu) / k_sd


def test_scores_are_standardized_energy_plus_knn_and_the_threshold_accepts_the_target():
    X, y = make_images(120)
    X_new, _ = make_images(30, seed=4)
    model = make_tiny_cnn()
    det = EnergyKNNDetector(model, k=5, target_tpr=0.9, batch_size=32, device="cpu").fit(X)
    assert det.classifier_ == "fc" and det.bank_.shape == (120, 16) and det.bank_.dtype == np.float32
    expected, train = reference_scores(model, X, X_new, 5)
    np.testing.assert_allclose(det.score_samples(X_new), expected, rtol=1e-4, atol=1e-4)
    # leave-one-out on the training images: the threshold accepts 90% of them, as a new image would be scored
    assert np.mean(train >= det.offset_) == pytest.approx(0.9, abs=1 / 120)
    assert np.mean(det.score_samples(X) >= det.offset_) > 0.9  # scored with itself in the bank: higher
    assert det.predict(X_new + 30.0).tolist() == [-1] * 30  # far from every training image


def test_a_model_whose_output_is_not_a_linear_layers_is_refused_clearly():
    X, _ = make_images(20)
    with pytest.raises(ValueError, match="penultimate features.*nn.Linear"):
        EnergyKNNDetector(AnyInputClassifier(), device="cpu").fit(X)  # a 1x1 convolution computes its logits
    softmax = nn.Sequential(make_tiny_cnn(), nn.Softmax(dim=1))  # a Linear, then something else
    with pytest.raises(ValueError, match="penultimate features"):
        EnergyKNNDetector(softmax, device="cpu").fit(X)
    with pytest.raises(ValueError, match="not the output of its layer 'stem.0'"):
        with_classifier_input(trace(make_tiny_cnn()), "stem.0")


def test_k_is_capped_with_a_warning_and_the_detector_pickles(tmp_path):
    X, _ = make_images(8)
    with pytest.warns(UserWarning, match="k=10 needs more than 8"):
        det = EnergyKNNDetector(make_tiny_cnn(), device="cpu").fit(X)
    assert det.n_neighbors_ == 7
    joblib.dump(det, tmp_path / "det.joblib")
    loaded = joblib.load(tmp_path / "det.joblib")
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))


@pytest.fixture(scope="module")
def two_stage():
    X, y = make_images(300)
    model = make_tiny_cnn()
    two = TwoStageDetector(ShallowFeatureOODDetector(model, "layer1", device="cpu"), cloud_method="energy+knn",
                           target_tpr=0.9).fit(X, y)
    return two, model


def test_the_exported_cloud_stage_scores_as_the_estimator(two_stage, tmp_path):
    two, model = two_stage
    assert isinstance(two.cloud_, EnergyKNNDetector) and two.cloud_.target_tpr == pytest.approx(0.9 ** 0.5)
    X = np.concatenate([make_images(40, seed=5)[0], make_images(10, seed=6)[0] * 3.0])  # ID and shifted images
    x = torch.from_numpy(X)
    edge, cloud = two.export_split()
    out = edge(x)
    logits, score, is_id = cloud(out.payload)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
    expected = two.cloud_.score_samples(X)
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(is_id.numpy(), two.cloud_.predict(X) == 1)
    assert 0 < is_id.sum() < len(X)  # both verdicts occur
    paths = save_split(edge, cloud, tmp_path, x[:4])  # .pt2 and ONNX
    loaded = load_split(tmp_path, as_split=True)
    assert loaded.manifest["cloud_detector"] | {"offset": 0} == {"method": "energy+knn", "offset": 0,
                                                                   "temperature": 1.0, "k": 10, "bank_size": 300}
    _, loaded_score, loaded_is_id = loaded.cloud(edge(x).payload)
    np.testing.assert_allclose(loaded_score.numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(loaded_is_id.numpy(), is_id.numpy())
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(paths["cloud.onnx"]))
    payload = out.payload if isinstance(out.payload, tuple) else (out.payload,)
    onnx_out = session.run(None, {i.name: p.numpy() for i, p in zip(session.get_inputs(), payload)})
    # ONNX Runtime's float32 convolutions are not PyTorch's: the scores agree to 1e-5 of their range
    assert np.abs(onnx_out[1] - expected).max() <= 1e-5 * np.ptp(expected)


def test_the_server_answers_with_the_energy_knn_verdict(two_stage, tmp_path):
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    two, _ = two_stage
    X, _ = make_images(30, seed=9)
    records = served_records(two, X, tmp_path)
    cloud_ok = two.cloud_.predict(X) == 1
    uploaded = [r for r in records if r.uploaded]
    assert uploaded and all(r.cloud_is_id == bool(cloud_ok[r.index]) for r in uploaded)
    assert json.loads((tmp_path / "split" / "split.json").read_text())["cloud_detector"]["method"] == "energy+knn"


def test_a_torchvision_classifier_inside_a_sequential_is_found_and_exported(tmp_path):
    """MobileNetV3's logits come from ``classifier.3``, after a dropout inside the same ``nn.Sequential``."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    X = torch.randn(40, 3, 64, 64, generator=torch.Generator().manual_seed(1)).numpy()
    two = TwoStageDetector(ShallowFeatureOODDetector(model, "features.2", device="cpu"),
                           cloud_method="energy+knn").fit(X, np.arange(40) % 5)
    assert two.cloud_.classifier_ == "classifier.3" and two.cloud_.bank_.shape == (40, 1024)
    edge, cloud = two.export_split()
    save_split(edge, cloud, tmp_path, torch.from_numpy(X[:2]), formats=("pt2",))
    loaded = load_split(tmp_path, as_split=True)
    expected = two.cloud_.score_samples(X[:8])
    _, score, _ = loaded.cloud(loaded.edge(torch.from_numpy(X[:8])).payload)
    assert np.abs(score.numpy() - expected).max() <= 1e-5 * max(np.ptp(expected), 1.0)


def test_a_cloud_head_refuses_a_method_it_cannot_score(two_stage):
    from earlin_sklearn import CloudHead

    two, _ = two_stage
    _, cloud = two.edge_.export_split()
    with pytest.raises(ValueError, match="method must be one of"):
        CloudHead(cloud, "odin", 0.0)  # needs an input gradient, which the cloud part does not have
    with pytest.raises(ValueError, match="needs knn="):
        CloudHead(cloud, "energy+knn", 0.0)
    with pytest.raises(ValueError, match="needs knn="):
        CloudHead(cloud, "energy", 0.0, knn=two.cloud_)


def test_the_knn_detector_caps_k_with_the_same_warning():
    from earlin_sklearn.baselines import KNNDetector

    with pytest.warns(UserWarning, match="k=50 needs more than 5 training samples; k=4 is used"):
        assert KNNDetector().fit(np.random.default_rng(0).normal(size=(5, 3))).n_neighbors_ == 4
