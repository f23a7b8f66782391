"""Activations that are not (N, C, H, W) (vision-transformer token sequences), and cuts across which a
non-tensor value (a batch size, a patch-grid size) would flow."""

import numpy as np
import pytest
import torch
from torchvision.models.vision_transformer import VisionTransformer

from earlin_sklearn import BackboneFeatures, ShallowFeatureOODDetector, save_split, split_model
from earlin_sklearn._features import pool_activation


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=3).eval()


def images(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).numpy()


def test_token_sequences_are_pooled_over_tokens_per_dimension():
    tokens = torch.randn(2, 17, 16)  # (N, 1 class token + 16 patches, dim)
    pooled = pool_activation(tokens, "meanstd", "auto")
    np.testing.assert_allclose(pooled[:, :16], tokens.mean(dim=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled[:, 16:], tokens.std(dim=1, unbiased=False), rtol=1e-5, atol=1e-6)
    with_cls = pool_activation(tokens, "mean", "tokens+cls")
    np.testing.assert_allclose(with_cls[:, :16], tokens[:, 0])
    np.testing.assert_allclose(with_cls[:, 16:], tokens[:, 1:].mean(dim=1), rtol=1e-5, atol=1e-6)
    # a 4-D activation stays per channel under "auto"; forcing tokens on it is a clear error
    conv = torch.randn(2, 4, 5, 5)
    np.testing.assert_allclose(pool_activation(conv, "mean", "auto"), conv.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs a token sequence"):
        pool_activation(conv, "mean", "tokens")


def test_vit_tap_reads_tokens_not_channels():
    X = images(8)
    features = BackboneFeatures(tiny_vit(), "encoder.layers.encoder_layer_0", device="cpu").fit(X)
    assert features.layout_ == "tokens"
    assert features.n_channels_ == 16  # the embedding dimension, not the 17 tokens
    assert features.transform(X).shape == (8, 32)
    cls = BackboneFeatures(tiny_vit(), "encoder.layers.encoder_layer_0", layout="tokens+cls", device="cpu").fit(X)
    assert cls.transform(X).shape == (8, 48)


@pytest.mark.parametrize("layer, layout", [("encoder.layers.encoder_layer_1", "auto"),
                                           ("encoder.layers.encoder_layer_0", "tokens+cls"),
                                           ("conv_proj", "auto")])
def test_vit_detector_splits_and_exports_exactly(layer, layout, tmp_path):
    net = tiny_vit()
    X, y = images(90), np.arange(90) % 3
    det = ShallowFeatureOODDetector(net, layer, layout=layout, device="cpu").fit(X, y)
    edge, cloud = det.export_split()
    x = torch.as_tensor(images(5, seed=1))
    out = edge(x)
    np.testing.assert_allclose(out.score.numpy(), det.score_samples(x.numpy()), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out.is_id.numpy(), det.predict(x.numpy()) == 1)
    with torch.no_grad():
        torch.testing.assert_close(cloud(out.payload), net(x), rtol=1e-5, atol=1e-5)
    paths = save_split(edge, cloud, tmp_path, x[:2], formats=("pt2",))
    assert paths["manifest"].exists()


def test_cut_at_conv_proj_settles_the_batch_size_and_grid_size():
    net = tiny_vit()
    with pytest.raises(ValueError, match="int"):  # without an example, an int would cross
        from earlin_sklearn._split import check_tensor_payload
        edge, _ = split_model(net, "conv_proj")
        check_tensor_payload(edge, torch.zeros(1, 3, 32, 32))
    edge, cloud = split_model(net, "conv_proj", example=torch.zeros(1, 3, 32, 32))
    assert edge.crossing_names == ["conv_proj"]
    assert sorted(edge.settled.values()) == ["batch", "constant", "constant"]
    for n in (1, 3, 7):  # the batch size is recomputed on the cloud side, never frozen at the example's
        x = torch.as_tensor(images(n, seed=n))
        activation, *crossing = edge(x)
        with torch.no_grad():
            torch.testing.assert_close(cloud(*crossing), net(x), rtol=1e-5, atol=1e-5)


class _BatchTimesTwo(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        n = x.shape[0] * 2  # depends on the batch but is not the batch size
        return self.conv(x).reshape(n, -1).sum(1)


def test_a_value_that_cannot_be_settled_is_refused_clearly():
    with pytest.raises(ValueError, match="not a constant and not the batch size"):
        split_model(_BatchTimesTwo(), "conv", example=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(1, ...\)"):
        split_model(_BatchTimesTwo(), "conv", example=torch.zeros(2, 3, 8, 8))
