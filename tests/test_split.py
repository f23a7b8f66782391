import numpy as np
import pytest
import torch
import torchvision

from earlin_sklearn import EdgeOutput, ShallowFeatureOODDetector, available_split_points, split_model
from earlin_sklearn.models import cifar_resnet

from .conftest import RANDOM_MODEL_RTOL, make_tiny_cnn

# (constructor, cut layers): shallow, nested inside containers, across skip connections.
MODELS = {
    "resnet18": (torchvision.models.resnet18, ["relu", "layer1", "layer2.0.bn2"]),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, ["features.1", "features.3.conv.1"]),
    "densenet121": (torchvision.models.densenet121, ["features.pool0", "features.denseblock1.denselayer2.relu2"]),
    "vgg11_bn": (torchvision.models.vgg11_bn, ["features.2", "features.6"]),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, ["features.1", "features.2.1.block.2"]),
    "cifar_resnet20": (lambda: cifar_resnet(20), ["relu", "layer1", "layer2.0.relu1"]),
    "cifar_resnet56": (lambda: cifar_resnet(56), ["layer1.4", "layer2"]),
}


def random_model(name):
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_split_is_exact(name):
    model = random_model(name)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(24, 3, 32, 32, generator=g)
    y = torch.arange(24) % 3
    with torch.no_grad():
        expected = model(X)
    for layer in MODELS[name][1]:
        det = ShallowFeatureOODDetector(model, layer, device="cpu").fit(X, y)
        edge, cloud = det.export_split()
        with torch.no_grad():
            out = edge(X)
            result = cloud(out.payload)
        assert isinstance(out, EdgeOutput)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5, msg=f"{name} cut at {layer}")
        np.testing.assert_allclose(out.score.numpy(), det.score_samples(X), rtol=RANDOM_MODEL_RTOL)
        np.testing.assert_array_equal(out.is_id.numpy(), det.predict(X) == 1)
        assert out.is_id.dtype == torch.bool and out.score.dtype == torch.float64


def test_skip_connections_send_every_crossing_tensor():
    model = random_model("resnet18")
    prefix, _ = split_model(model, "layer1.0.bn2")
    activation, *crossing = prefix(torch.randn(2, 3, 32, 32))
    # the block's input (for the residual addition) and bn2's output both cross
    assert len(crossing) == 2 and prefix.crossing_names[-1] == "layer1_0_bn2"
    det = ShallowFeatureOODDetector(model, "layer1.0.bn2", device="cpu").fit(torch.randn(20, 3, 32, 32))
    assert isinstance(det.export_split()[0](torch.randn(2, 3, 32, 32)).payload, tuple)


def test_cloud_accepts_a_tuple_or_separate_tensors():
    model = random_model("resnet18")
    X = torch.randn(3, 3, 32, 32)
    edge, cloud = ShallowFeatureOODDetector(model, "layer2.0.bn2", device="cpu").fit(X.repeat(7, 1, 1, 1)).export_split()
    payload = edge(X).payload
    torch.testing.assert_close(cloud(payload), cloud(*payload))


def test_available_split_points():
    points = available_split_points(make_tiny_cnn())
    assert points[:4] == ["stem", "stem.0", "stem.1", "stem.2"]
    assert "layer1" in points and "fc" in points
    assert available_split_points(cifar_resnet(20))[:4] == ["conv1", "bn1", "relu", "layer1"]


def test_cut_at_an_uncalled_layer_is_a_clear_error():
    model = make_tiny_cnn()
    model.unused = torch.nn.ReLU()
    with pytest.raises(ValueError, match="never called"):
        split_model(model, "unused")
    with pytest.raises(ValueError, match="Closest valid names"):
        split_model(model, "layer9")


def test_untraceable_model_is_a_clear_error():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            x = self.conv(x)
            return x if x.sum() > 0 else -x  # data-dependent control flow

    with pytest.raises(ValueError, match="could not trace"):
        split_model(Branchy(), "conv")


def test_export_split_leaves_the_detector_unchanged(images):
    X, y = images
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y)
    before = det.score_samples(X)
    edge, _ = det.export_split()
    edge.head.offset.fill_(123.0)
    np.testing.assert_array_equal(det.score_samples(X), before)
    assert det.pipeline_["features"].module_ is not edge.prefix
