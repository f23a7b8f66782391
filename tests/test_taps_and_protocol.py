"""The default detector: extra taps inside the edge part, the Yeo-Johnson step, one threshold, and the
no-OOD protocol (nothing that chooses a default or an ``auto`` value ever sees OOD data)."""

import numpy as np
import pytest
import torch
import torchvision
from sklearn.preprocessing import PowerTransformer

import earlin_sklearn._scorers as scorers
from earlin_sklearn import BackboneFeatures, ShallowFeatureOODDetector, recommend_layer
from earlin_sklearn._features import resolve_extra_layers
from earlin_sklearn.models import cifar_resnet, cifar_shufflenet_v2

from .conftest import EDGE_RTOL, RANDOM_MODEL_RTOL


def test_auto_extra_tap_is_the_block_before_the_last_one():
    assert resolve_extra_layers(cifar_resnet(20), "layer1", "auto") == ["layer1.1"]
    assert resolve_extra_layers(cifar_resnet(56), "layer1", "auto") == ["layer1.7"]
    assert resolve_extra_layers(cifar_resnet(20), "layer1.2", "auto") == ["layer1.1"]
    assert resolve_extra_layers(cifar_shufflenet_v2(), "stage2", "auto") == ["stage2.2"]
    # a single layer, or the first block, has no block before it
    assert resolve_extra_layers(cifar_resnet(20), "relu", "auto") == []
    assert resolve_extra_layers(cifar_resnet(20), "layer1.0", "auto") == []
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    assert resolve_extra_layers(net, "1", "auto") == []
    assert resolve_extra_layers(net, "1", ()) == []
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_extra_layers(net, "1", ["nope"])


def test_extra_taps_are_concatenated_before_the_layer():
    net = cifar_resnet(20)
    X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    both = BackboneFeatures(net, "layer1", extra_layers=["layer1.1"], device="cpu").fit(X)
    first = BackboneFeatures(net, "layer1.1", device="cpu").fit(X)
    last = BackboneFeatures(net, "layer1", device="cpu").fit(X)
    np.testing.assert_allclose(both.transform(X), np.hstack([first.transform(X), last.transform(X)]), rtol=1e-6)
    assert both.get_feature_names_out().size == 64


def test_an_extra_tap_after_the_layer_is_refused():
    net = cifar_resnet(20)
    X = torch.randn(4, 3, 32, 32)
    with pytest.raises(ValueError, match="must run before"):
        BackboneFeatures(net, "layer1", extra_layers=["layer2.0"], device="cpu").fit(X)
    with pytest.raises(ValueError, match="must not contain `layer`"):
        BackboneFeatures(net, "layer1", extra_layers=["layer1"], device="cpu").fit(X)


def test_an_extra_tap_inside_a_non_sequential_cut_is_refused_at_export():
    # layer1.0 is a residual block (not an nn.Sequential): its output is not its last child's
    net = cifar_resnet(20)
    X = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    det = ShallowFeatureOODDetector(net, "layer1.0", extra_layers=["layer1.0.conv1"], device="cpu").fit(X)
    with pytest.raises(ValueError, match="only when it is an nn.Sequential"):
        det.export_split()


def test_a_layer_whose_output_is_not_a_tensor_is_named_as_such():
    class DictOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return {"out": self.conv(x)}

    net = torch.nn.Sequential(DictOut())
    with pytest.raises(TypeError, match="returned dict, not a tensor"):
        BackboneFeatures(net, "0", device="cpu").fit(torch.randn(4, 3, 8, 8))


def test_shufflenet_loads_a_state_dict_the_user_has(tmp_path):
    torch.manual_seed(1)
    trained = cifar_shufflenet_v2()
    path = tmp_path / "shufflenet.pt"
    torch.save(trained.state_dict(), path)
    loaded = cifar_shufflenet_v2(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x))
    assert loaded.conv1[0].stride == (1, 1) and isinstance(loaded.maxpool, torch.nn.Identity)
    torch.save({"fc.weight": torch.zeros(10, 1024)}, path)
    with pytest.raises(RuntimeError, match="Missing key"):
        cifar_shufflenet_v2(path)  # strict: a partial or foreign state dict is refused
    with pytest.raises(ValueError, match="width"):
        cifar_shufflenet_v2(width="x3_0")


def _fit_default(net, layer, size=32, n=96):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, size, size, generator=g)
    y = np.arange(n) % 3
    return ShallowFeatureOODDetector(net, layer, device="cpu").fit(X, y), g


def test_default_pipeline_has_the_yeo_johnson_step():
    det, _ = _fit_default(cifar_resnet(20), "layer1")
    assert isinstance(det.pipeline_["gaussianize"], PowerTransformer)
    assert det.pipeline_["features"].extra_layers_ == ["layer1.1"]
    plain = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", gaussianize=None, extra_layers=(), device="cpu")
    plain.fit(torch.randn(40, 3, 32, 32))
    assert plain.pipeline_["gaussianize"] == "passthrough" and plain.pipeline_["features"].extra_layers_ == []


@pytest.mark.parametrize("build, layer", [
    (lambda: cifar_resnet(20), "layer1"),
    (lambda: cifar_shufflenet_v2(), "stage2"),
])
def test_export_of_the_default_detector_matches(build, layer):
    net = build()
    det, g = _fit_default(net, layer)
    X = torch.cat([torch.randn(10, 3, 32, 32, generator=g), 4 * torch.randn(10, 3, 32, 32, generator=g)])
    edge, cloud = det.export_split()
    with torch.no_grad():
        out = edge(X)
        np.testing.assert_allclose(out.score.numpy(), det.score_samples(X), rtol=EDGE_RTOL, atol=EDGE_RTOL)
        np.testing.assert_array_equal(out.is_id.numpy(), det.predict(X) == 1)
        torch.testing.assert_close(cloud(out.payload), net(X))


@pytest.mark.parametrize("name, layer, size", [
    ("mobilenet_v3_small", "features.2", 64),
    ("shufflenet_v2_x0_5", "stage2", 64),
    ("efficientnet_b0", "features.2", 64),
])
def test_mobile_models_tap_split_and_export(name, layer, size):
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    det, g = _fit_default(net, layer, size=size, n=60)
    X = torch.randn(6, 3, size, size, generator=g)
    edge, cloud = det.export_split()
    with torch.no_grad():
        out = edge(X)
        np.testing.assert_allclose(out.score.numpy(), det.score_samples(X), rtol=RANDOM_MODEL_RTOL)
        torch.testing.assert_close(cloud(out.payload), net(X), rtol=1e-4, atol=1e-4)


def test_one_threshold_moves_every_path():
    det, g = _fit_default(cifar_resnet(20), "layer1")
    X = torch.randn(30, 3, 32, 32, generator=g)
    scores = det.score_samples(X)
    det.offset_ = float(np.median(scores))
    expected = np.where(scores >= det.offset_, 1, -1)
    np.testing.assert_array_equal(det.predict(X), expected)
    np.testing.assert_array_equal(det.pipeline_.predict(X.numpy()), expected)
    edge, _ = det.export_split()
    with torch.no_grad():
        np.testing.assert_array_equal(np.where(edge(X).is_id.numpy(), 1, -1), expected)
    assert det.pipeline_["distance"].offset_ == det.offset_


def test_overflowing_features_are_rejected_not_nan():
    det, _ = _fit_default(cifar_resnet(20), "layer1")
    X = torch.full((2, 3, 32, 32), 3e37)
    scores = det.score_samples(X)
    assert not np.isnan(scores).any()
    assert (det.predict(X) == -1).all()
    edge, _ = det.export_split()
    with torch.no_grad():
        out = edge(X)
    assert not torch.isnan(out.score).any() and not out.is_id.any()


def test_choices_never_see_ood_data(monkeypatch):
    """recommend_layer (the package's only automatic choice over configurations) scores candidates on ID
    rows and on pseudo-OOD made from ID rows: every array it fits or scores is traced back to X."""
    net = cifar_resnet(20)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, 32, 32, generator=g)
    y = np.arange(60) % 3
    id_rows = {x.numpy().tobytes() for x in X}
    made_from_id = set()
    real_make = scorers.make_pseudo_ood

    def traced_make(Z, kind, random_state=None):
        Z = np.asarray(Z)
        assert all(z.tobytes() in id_rows for z in Z), "pseudo-OOD made from something other than ID data"
        out = real_make(Z, kind, random_state)
        made_from_id.update(o.tobytes() for o in out)
        return out

    seen = []
    real_pooled = BackboneFeatures._pooled_batches

    def traced_pooled(self, Z, owner, taps=None):  # every image the backbone runs in the one pass
        seen.append(("score", np.asarray(Z, dtype=np.float32)))
        return real_pooled(self, Z, owner, taps)

    monkeypatch.setattr(scorers, "make_pseudo_ood", traced_make)
    monkeypatch.setattr(BackboneFeatures, "_pooled_batches", traced_pooled)
    rec = recommend_layer(net, X, y, layers=["relu", "layer1"], max_edge_flops=1.0, cv=2)
    assert rec.layer in {"relu", "layer1"}
    assert any(kind == "score" for kind, _ in seen) and made_from_id
    for kind, Z in seen:
        for z in Z:
            assert z.tobytes() in id_rows or (kind == "score" and z.tobytes() in made_from_id)
