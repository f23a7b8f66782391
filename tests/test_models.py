import numpy as np
import pytest
import torch

from earlin_sklearn.datasets import load_digits_images, natural_patches, noise_images, printed_letters
from earlin_sklearn.models import CifarResNet, cifar_resnet


@pytest.mark.parametrize("depth,blocks", [(20, 3), (32, 5), (44, 7), (56, 9)])
def test_cifar_resnets_build_with_random_weights(depth, blocks):
    model = cifar_resnet(depth)
    assert len(model.layer1) == len(model.layer3) == blocks and not model.training
    n_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert n_layers == depth  # the depth counts the convolutions and the classifier
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_checkpoint_in_the_published_format_loads(tmp_path):
    torch.manual_seed(0)
    source = CifarResNet(3)
    # the pytorch_resnet_cifar10 checkpoints: {"state_dict": {"module.<key>": tensor}} (DataParallel)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "best_prec1": 91.0},
               tmp_path / "resnet20.th")
    loaded = cifar_resnet(20, tmp_path / "resnet20.th")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source.eval()(x))
    torch.save(source.state_dict(), tmp_path / "plain.pt")  # a plain state dict works too
    assert torch.equal(cifar_resnet(20, tmp_path / "plain.pt").linear.weight, source.linear.weight)


def test_option_a_shortcut_pads_channels_and_subsamples():
    block = cifar_resnet(20).layer2[0]
    out = block.shortcut(torch.ones(1, 16, 8, 8))
    assert out.shape == (1, 32, 4, 4)
    assert out[0, :8].sum() == 0 and out[0, 24:].sum() == 0 and out[0, 8:24].sum() == 16 * 16


def test_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        cifar_resnet(18)


def test_offline_image_sets():
    rng = np.random.default_rng(0)
    X, y = load_digits_images()
    assert X.shape == (1797, 1, 8, 8) and X.dtype == np.float32 and 0 <= X.min() and X.max() <= 1
    for images in (natural_patches(10, rng), printed_letters(10, rng), noise_images(10, "gaussian", rng), noise_images(10, "uniform", rng)):
        assert images.shape == (10, 1, 8, 8) and images.dtype == np.float32
        assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
    with pytest.raises(ValueError, match="kind"):
        noise_images(1, "pink", rng)


def test_train_digits_cnn_trains_with_the_package_thread_setting(monkeypatch):
    """Half the cores ("auto", as the detector's n_threads), and torch's own setting restored afterwards."""
    import torch

    from earlin_sklearn import models
    from earlin_sklearn._torch import default_threads

    seen = []
    forward = models.DigitsCNN.forward
    monkeypatch.setattr(models.DigitsCNN, "forward", lambda self, x: seen.append(torch.get_num_threads()) or
                        forward(self, x))
    before = torch.get_num_threads()
    X = np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32)
    models.train_digits_cnn(X, np.arange(64) % 10, epochs=1)
    assert seen and set(seen) == {default_threads()}
    assert torch.get_num_threads() == before
    seen.clear()
    models.train_digits_cnn(X, np.arange(64) % 10, epochs=1, n_threads=None)
    assert set(seen) == {before}
