"""One home for torch state (earlin_sklearn._torch.TorchStateMixin): every estimator that holds a torch
module pickles it once, on the CPU, with the torch version, and loads on a machine without the fitted device."""

import io
import pickle

import numpy as np
import pytest
import torch

import earlin_sklearn._torch as torch_state
from earlin_sklearn import BackboneFeatures, ShallowFeatureOODDetector
from earlin_sklearn.baselines import LogitDetector
from earlin_sklearn.models import cifar_resnet


def _data(n=60):
    X = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    return X, np.arange(n) % 3


def _estimators(net):
    return [
        BackboneFeatures(net, "layer1", device="cpu"),
        ShallowFeatureOODDetector(net, "layer1", device="cpu"),
        LogitDetector(net, "energy", device="cpu"),
    ]


def _output(est, X):
    return est.transform(X) if isinstance(est, BackboneFeatures) else est.score_samples(X)


def _state_dict_bytes(net):
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return len(buffer.getvalue())


@pytest.mark.parametrize("index", [0, 1, 2], ids=["BackboneFeatures", "ShallowFeatureOODDetector", "LogitDetector"])
def test_fitted_on_a_gpu_loads_on_a_cpu_machine(index, monkeypatch):
    net = cifar_resnet(20)
    X, y = _data()
    est = _estimators(net)[index].fit(X, y)
    expected = _output(est, X)
    # simulate a GPU fit: the fitted device says CUDA; this machine has none
    for holder in [est, *(getattr(est, "pipeline_", {"f": None}).named_steps.values()
                          if hasattr(est, "pipeline_") else [])]:
        if hasattr(holder, "device_"):
            holder.device_ = torch.device("cuda:0")
    blob = pickle.dumps(est)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="runs on the CPU instead"):
        loaded = pickle.loads(blob)
    np.testing.assert_array_equal(_output(loaded, X), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_fit_from_a_loader_of_uint8_images_matches_the_cpu_fit():
    from torch.utils.data import DataLoader, TensorDataset

    net = cifar_resnet(20)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (120, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(120) % 3
    loader = DataLoader(TensorDataset(pixels, labels), batch_size=32)  # uint8 crosses to the GPU, cast there
    with pytest.warns(UserWarning, match="uint8"):
        gpu = ShallowFeatureOODDetector(net, "layer1", device="cuda").fit(loader)
    with pytest.warns(UserWarning, match="uint8"):
        cpu = ShallowFeatureOODDetector(net, "layer1", device="cpu").fit(loader)
    X = pixels[:40].float().numpy()
    np.testing.assert_allclose(gpu.score_samples(X), cpu.score_samples(X), rtol=1e-3, atol=1e-3)
    assert (gpu.predict(X) == cpu.predict(X)).mean() >= 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_real_gpu_fit_loads_on_cpu(monkeypatch):
    net = cifar_resnet(20)
    X, y = _data()
    det = ShallowFeatureOODDetector(net, "layer1", device="cuda").fit(X, y)
    blob = pickle.dumps(det)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="runs on the CPU instead"):
        loaded = pickle.loads(blob)
    assert next(loaded.pipeline_["features"].module_.parameters()).device.type == "cpu"
    np.testing.assert_allclose(loaded.score_samples(X), det.score_samples(X), rtol=1e-4)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["BackboneFeatures", "ShallowFeatureOODDetector", "LogitDetector"])
def test_the_backbone_is_stored_once(index):
    net = cifar_resnet(20)
    X, y = _data()
    est = _estimators(net)[index].fit(X, y)
    blob = pickle.dumps(est)
    moments = getattr(est, "moments_", None)  # the streaming statistics, the only other large state
    statistics = 0 if moments is None else moments.sample_rows.nbytes + moments.scatter.nbytes
    assert len(blob) <= 1.1 * _state_dict_bytes(net) + statistics
    loaded = pickle.loads(blob)
    param = "model" if isinstance(est, LogitDetector) else "backbone"
    fitted = loaded._fitted_copy_of_param()
    assert getattr(loaded, param) is fitted  # the parameter is the fitted frozen copy, same weights
    for a, b in zip(net.state_dict().values(), fitted.state_dict().values()):
        torch.testing.assert_close(a, b)
    refit = loaded.fit(X, y)  # and a loaded estimator refits as a fresh one would
    np.testing.assert_allclose(_output(refit, X), _output(est, X), rtol=1e-6)


def test_an_unfitted_estimator_pickles_its_parameter():
    net = cifar_resnet(20)
    loaded = pickle.loads(pickle.dumps(ShallowFeatureOODDetector(net, "layer1")))
    assert isinstance(loaded.backbone, torch.nn.Module)


def test_another_torch_version_is_named(monkeypatch):
    net = cifar_resnet(20)
    X, y = _data()
    det = ShallowFeatureOODDetector(net, "layer1", device="cpu").fit(X, y)
    monkeypatch.setattr(torch, "__version__", "1.0.0")
    blob = pickle.dumps(det)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="pickled with torch 1.0.0"):
        loaded = pickle.loads(blob)
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))

    # a module torch cannot read: one clear error naming both versions, not a deep traceback
    features = det.pipeline_["features"]
    state = features.__getstate__()
    state[torch_state._STATE_KEY]["torch_version"] = "1.0.0"
    state[torch_state._STATE_KEY]["modules"]["module_"] = b"not a torch file"
    broken = BackboneFeatures.__new__(BackboneFeatures)
    with pytest.warns(UserWarning, match="pickled with torch 1.0.0"), \
            pytest.raises(RuntimeError, match=r"saved with torch 1\.0\.0 and this machine has torch"):
        broken.__setstate__(state)


def test_n_threads_applies_while_the_backbone_runs_and_is_restored():
    from earlin_sklearn._torch import default_threads

    seen = []
    net = cifar_resnet(20)
    net.layer1.register_forward_hook(lambda m, a, o: seen.append(torch.get_num_threads()))
    X, y = _data(20)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for n_threads, expected in ((1, 1), ("auto", default_threads()), (None, 2)):
            seen.clear()
            det = ShallowFeatureOODDetector(net, "layer1", device="cpu", n_threads=n_threads).fit(X, y)
            det.score_samples(X)
            assert seen and set(seen) == {expected}, (n_threads, seen)
            assert torch.get_num_threads() == 2  # the caller's setting is back
        with pytest.raises(ValueError, match="n_threads"):
            ShallowFeatureOODDetector(net, "layer1", n_threads=0).fit(X, y)
    finally:
        torch.set_num_threads(before)
