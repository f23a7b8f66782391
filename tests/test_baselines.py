import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from earlin_sklearn.baselines import KNNDetector, LogitDetector


def logits_of(net, X):
    with torch.no_grad():
        return net(torch.from_numpy(X)).double()


@pytest.fixture
def fitted(tiny_cnn, images):
    return tiny_cnn, images[0]


@pytest.mark.parametrize("method,T", [("msp", 1.0), ("msp", 2.0), ("energy", 1.0), ("energy", 3.0), ("maxlogit", None)])
def test_logit_scores_match_their_definitions(fitted, method, T):
    net, X = fitted
    det = LogitDetector(net, method, temperature=T, device="cpu").fit(X)
    z = logits_of(net, X)
    expected = {
        "msp": lambda: F.softmax(z / (T or 1), 1).max(1).values,
        "energy": lambda: (T or 1) * torch.logsumexp(z / (T or 1), 1),
        "maxlogit": lambda: z.max(1).values,
    }[method]()
    np.testing.assert_allclose(det.score_samples(X), expected.numpy(), rtol=1e-5)
    assert np.mean(det.predict(X) == 1) >= 0.95


def test_odin_is_msp_after_the_perturbation(fitted):
    net, X = fitted
    eps, T, std = 0.01, 100.0, (0.5, 0.25, 1.0)
    det = LogitDetector(net, "odin", temperature=T, epsilon=eps, input_std=std, device="cpu").fit(X)
    x = torch.from_numpy(X).requires_grad_(True)
    logits = net(x) / T
    F.cross_entropy(logits, logits.argmax(1)).backward()
    x_hat = x.detach() - eps * torch.sign(x.grad) / torch.tensor(std).view(1, 3, 1, 1)
    expected = F.softmax(logits_of(net, x_hat.numpy()) / T, 1).max(1).values
    np.testing.assert_allclose(det.score_samples(X), expected.numpy(), rtol=1e-5)
    # the step raises the confidence of the predicted class
    plain = LogitDetector(net, "msp", temperature=T, device="cpu").fit(X).score_samples(X)
    assert np.mean(det.score_samples(X) > plain) > 0.9
    assert all(p.requires_grad for p in net.parameters())  # the user's model is untouched


def test_logit_detector_reads_loaders(fitted):
    net, X = fitted
    det = LogitDetector(net, device="cpu").fit(DataLoader(TensorDataset(torch.from_numpy(X)), batch_size=16))
    assert det.n_features_in_ == 3
    np.testing.assert_allclose(det.score_samples(X), det.score_samples(TensorDataset(torch.from_numpy(X))))


def brute_force_kth(train, query, k, normalize):
    if normalize:
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        query = query / np.linalg.norm(query, axis=1, keepdims=True)
    d = np.linalg.norm(query[:, None] - train[None], axis=2)
    return np.sort(d, axis=1)[:, k - 1]


@pytest.mark.parametrize("normalize", [True, False])
def test_knn_is_the_kth_neighbour_distance(normalize):
    rng = np.random.default_rng(0)
    train, query = rng.normal(size=(200, 5)), rng.normal(size=(30, 5)) * 2
    det = KNNDetector(k=7, normalize=normalize).fit(train)
    np.testing.assert_allclose(-det.score_samples(query), brute_force_kth(train, query, 7, normalize))


def test_knn_threshold_is_leave_one_out():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 3))
    det = KNNDetector(k=1, normalize=False, target_tpr=0.9).fit(train)
    assert det.offset_ < 0  # with self-matches every training score would be 0
    new = rng.normal(size=(4000, 3))
    assert abs(np.mean(det.predict(new) == 1) - 0.9) < 0.04


def test_knn_caps_k():
    with pytest.warns(UserWarning, match="k=4 is used"):
        assert KNNDetector(k=50).fit(np.random.default_rng(0).normal(size=(5, 2))).n_neighbors_ == 4


def test_baselines_separate_ood_on_a_trained_model():
    from earlin_sklearn.datasets import load_digits_images, noise_images
    from earlin_sklearn.metrics import auroc
    from earlin_sklearn.models import train_digits_cnn

    X, y = load_digits_images()
    X = (X - 0.3) / 0.4
    net = train_digits_cnn(X[:600], y[:600], epochs=5)
    noise = (noise_images(200, "uniform", np.random.default_rng(0)) - 0.3) / 0.4
    # better than chance on a 5-epoch toy model (energy is not: its formula is tested above)
    for method, floor in (("msp", 0.8), ("odin", 0.65)):
        det = LogitDetector(net, method, device="cpu").fit(X[:600])
        assert auroc(det.score_samples(X[600:900]), det.score_samples(noise)) > floor, method
