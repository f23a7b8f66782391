import joblib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from earlin_sklearn import BackboneFeatures
from earlin_sklearn._features import pool_activation

from .conftest import make_images, make_tiny_cnn


def full_forward_activation(net, layer, X):
    store = {}
    handle = net.get_submodule(layer).register_forward_hook(lambda m, a, o: store.setdefault("out", o))
    with torch.no_grad():
        net(torch.from_numpy(X))
    handle.remove()
    return store["out"]


@pytest.mark.parametrize("pooling,width", [("mean", 12), ("max", 12), ("meanstd", 24)])
def test_pooled_features_match_the_layer_output(tiny_cnn, images, pooling, width):
    X, _ = images
    F = BackboneFeatures(tiny_cnn, "layer1", pooling=pooling, batch_size=16, device="cpu").fit_transform(X)
    act = full_forward_activation(tiny_cnn, "layer1", X)
    expected = {
        "mean": act.mean(dim=(2, 3)),
        "max": act.amax(dim=(2, 3)),
        "meanstd": torch.cat([act.mean(dim=(2, 3)), act.std(dim=(2, 3), correction=0)], 1),
    }[pooling]
    assert F.shape == (len(X), width) and F.dtype == np.float64
    np.testing.assert_allclose(F, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_nested_layer_and_two_d_activation():
    act = torch.arange(6.0).view(2, 3)
    assert torch.equal(pool_activation(act, "mean"), act)
    assert torch.equal(pool_activation(act, "meanstd")[:, 3:], torch.zeros(2, 3))
    net, (X, _) = make_tiny_cnn(), make_images(10)
    F = BackboneFeatures(net, "stem.1", pooling="mean", device="cpu").fit_transform(X)  # BatchNorm inside the stem
    assert F.shape == (10, 8)


def test_forward_stops_after_the_tapped_layer(images):
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the forward pass went past the tapped layer")

    net = make_tiny_cnn()
    net.layer2 = Boom()
    X, _ = images
    assert BackboneFeatures(net, "layer1", device="cpu").fit_transform(X).shape == (len(X), 24)


def test_unknown_layer_lists_closest_names(tiny_cnn, images):
    with pytest.raises(ValueError, match=r"'layr1'.*Closest valid names: \['layer1'"):
        BackboneFeatures(tiny_cnn, "layr1").fit(images[0])


def test_layer_never_called_is_a_clear_error(images):
    net = make_tiny_cnn()
    net.unused = torch.nn.ReLU()
    with pytest.raises(ValueError, match="never called"):
        BackboneFeatures(net, "unused", device="cpu").fit(images[0])


def test_channels_last_images_get_a_hint(tiny_cnn, images):
    X = images[0].transpose(0, 2, 3, 1)
    with pytest.raises(ValueError, match=r"channels-last.*transpose\(0, 3, 1, 2\)"):
        BackboneFeatures(tiny_cnn, "layer1").fit(X)


def test_uint8_images_warn(tiny_cnn):
    X = np.random.default_rng(0).integers(0, 255, (4, 3, 8, 8), dtype=np.uint8)
    with pytest.warns(UserWarning, match="uint8"):
        BackboneFeatures(tiny_cnn, "layer1", device="cpu").fit(X)


def test_loaders_datasets_tensors_and_arrays_agree(tiny_cnn, images):
    X, y = images
    ft = BackboneFeatures(tiny_cnn, "layer1", batch_size=7, device="cpu").fit(X)
    ref = ft.transform(X)
    ds = TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
    for data in (torch.from_numpy(X), ds, DataLoader(ds, batch_size=11), DataLoader(TensorDataset(torch.from_numpy(X)), batch_size=5)):
        np.testing.assert_allclose(ft.transform(data), ref, rtol=1e-6, atol=1e-7)
    F, labels = ft.features_and_labels(DataLoader(ds, batch_size=11))
    np.testing.assert_array_equal(labels, y)
    assert ft.features_and_labels(X)[1] is None
    assert BackboneFeatures(tiny_cnn, "layer1", device="cpu").fit(DataLoader(ds, batch_size=4)).n_features_in_ == 3


def test_bad_batches_are_a_clear_error(tiny_cnn, images):
    ft = BackboneFeatures(tiny_cnn, "layer1", device="cpu").fit(images[0])
    with pytest.raises(TypeError, match="Each batch must be a tensor"):
        ft.transform(DataLoader([{"img": torch.zeros(3, 12, 12)}], batch_size=1))


def test_verbose_shows_a_progress_bar(tiny_cnn, images, capsys):
    BackboneFeatures(tiny_cnn, "layer1", batch_size=30, verbose=1, device="cpu").fit_transform(images[0])
    err = capsys.readouterr().err
    assert "features@layer1" in err and "3/3" in err


def test_quiet_by_default(tiny_cnn, images, capsys):
    BackboneFeatures(tiny_cnn, "layer1", device="cpu").fit_transform(images[0])
    assert capsys.readouterr().err == ""


def test_pickle_round_trip_and_cuda_fallback(tiny_cnn, images, tmp_path, monkeypatch):
    X, _ = images
    ft = BackboneFeatures(tiny_cnn, "layer1", device="cpu").fit(X)
    path = tmp_path / "ft.joblib"
    joblib.dump(ft, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.transform(X), ft.transform(X))
    assert not loaded.module_._forward_hooks and not loaded.module_.layer1._forward_hooks

    # A model fitted on a GPU loads on a machine without one: CPU, with a warning.
    state = ft.__getstate__()
    state["device_"] = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    moved = BackboneFeatures.__new__(BackboneFeatures)
    with pytest.warns(UserWarning, match="runs on the CPU instead"):
        moved.__setstate__(state)
    assert moved.device_ == torch.device("cpu")
    np.testing.assert_array_equal(moved.transform(X), ft.transform(X))


def test_feature_names(tiny_cnn, images):
    ft = BackboneFeatures(tiny_cnn, "layer1", pooling="meanstd", device="cpu").fit(images[0])
    names = ft.get_feature_names_out()
    assert len(names) == 24 and names[0] == "backbonefeatures0"
    assert ft.activation_shape_ == (12, 12, 12) and ft.input_shape_ == (3, 12, 12)


def test_mixed_precision_runs_the_backbone_under_autocast_and_pools_in_float32():
    import torch

    from earlin_sklearn import BackboneFeatures
    from earlin_sklearn.models import cifar_resnet

    torch.manual_seed(0)
    X = torch.rand(6, 3, 32, 32).numpy()
    net = cifar_resnet(20)
    seen = []
    net.layer1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    full = BackboneFeatures(net, "layer1", device="cpu").fit(X).transform(X)
    half = BackboneFeatures(net, "layer1", device="cpu", precision="bfloat16").fit(X).transform(X)
    assert seen[-1] == torch.bfloat16 and seen[0] == torch.float32
    assert half.dtype == np.float64 and np.isfinite(half).all()
    # bfloat16 keeps 8 bits of mantissa: the channel means agree to about 1%, not exactly
    means = slice(0, 16)
    assert np.allclose(half[:, means], full[:, means], rtol=0.05, atol=0.05)
    assert not np.array_equal(half, full)
