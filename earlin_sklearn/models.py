"""Models: a small CNN for the offline demo, CIFAR ResNets (:func:`cifar_resnet`) and ShuffleNetV2 (:func:`cifar_shufflenet_v2`)."""

import torch
from torch import nn

from ._torch import torch_threads


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 images: ``stem`` -> ``layer1`` -> ``layer2`` -> ``fc``."""

    def __init__(self, n_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def train_digits_cnn(X, y, epochs=15, seed=0, n_threads="auto"):
    """Train :class:`~earlin_sklearn.models.DigitsCNN` with Adam; a few seconds on 2 CPU cores.

    Parameters
    ----------
    X : ndarray of shape (N, 1, 8, 8), float32
        Normalized images.
    y : ndarray of shape (N,), int64
    epochs : int, default=15
    seed : int, default=0
    n_threads : int, "auto" or None, default="auto"
        torch intra-op threads while training, as the detector's own
        ``n_threads``: ``"auto"`` takes half the cores (torch's default of
        every core slows to a crawl when another process holds one); None
        leaves torch's setting.

    Returns
    -------
    net : earlin_sklearn.models.DigitsCNN
        In evaluation mode.
    """
    torch.manual_seed(seed)
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    g = torch.Generator().manual_seed(seed)
    with torch_threads(n_threads):
        for _ in range(epochs):
            net.train()
            for idx in torch.randperm(len(Xt), generator=g).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
                opt.step()
    return net.eval()


# CIFAR ResNets -----------------------------------------------------------------------------------

#: Input normalization of the published CIFAR-10 ResNet checkpoints (RGB in [0, 1]).
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: stride-2 subsampling, zero-padded new channels."""

    def __init__(self, planes):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, section 4.2), as in the pytorch_resnet_cifar10 checkpoints.

    Stem ``conv1`` -> ``bn1`` -> ``relu`` (16 channels), then ``layer1``,
    ``layer2``, ``layer3`` of ``n`` basic blocks each (16, 32, 64 channels),
    ``pool`` and ``linear``. Module names match the checkpoints' keys; the
    ReLUs are modules (no parameters) so that every stage can be tapped:
    ``"relu"`` (stem), ``"layer1"``, ``"layer2"``, ``"layer3"``.
    """

    def __init__(self, n_blocks, n_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes_in = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n_blocks):
                blocks.append(CifarBasicBlock(planes_in, planes, stride=2 if (i > 0 and j == 0) else 1))
                planes_in = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, n_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.linear(torch.flatten(self.pool(x), 1))


CIFAR_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9}


def cifar_resnet(depth=20, weights=None, n_classes=10):
    """A CIFAR ResNet-20/32/44/56, with random weights or loaded from a checkpoint.

    Parameters
    ----------
    depth : {20, 32, 44, 56}, default=20
    weights : str or Path, default=None
        A checkpoint of the pytorch_resnet_cifar10 project (a dict with a
        ``state_dict`` whose keys start with ``module.``) or a plain state
        dict; loaded with ``torch.load(..., weights_only=True)``. None: random
        (Kaiming) weights.
    n_classes : int, default=10

    Returns
    -------
    model : CifarResNet
        In evaluation mode. Expects RGB in [0, 1] normalized with
        ``CIFAR_MEAN`` and ``CIFAR_STD``.
    """
    if depth not in CIFAR_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(CIFAR_DEPTHS)}; got {depth}.")
    model = CifarResNet(CIFAR_DEPTHS[depth], n_classes)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model.load_state_dict(state)
    return model.eval()


# ShuffleNetV2 for CIFAR ----------------------------------------------------------------------------

#: Input normalization of the CIFAR-10 ShuffleNetV2 checkpoint (pytorch-cifar-models; RGB in [0, 1]).
#: Not the ImageNet statistics that ``CIFAR_MEAN`` / ``CIFAR_STD`` hold for the ResNets.
SHUFFLENET_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
SHUFFLENET_CIFAR_STD = (0.2023, 0.1994, 0.2010)


def cifar_shufflenet_v2(weights=None, n_classes=10, width="x0_5"):
    """torchvision's ShuffleNetV2 with a CIFAR stem, random or loaded from a state dict.

    The stem's 3x3 stride-2 convolution becomes a 3x3 stride-1 one (3 -> 24
    channels, no bias) and the max-pool an identity, so that 32x32 inputs keep
    their resolution into ``stage2`` (16x16), ``stage3`` (8x8) and ``stage4``
    (4x4), as in the pytorch-cifar-models checkpoints.

    Parameters
    ----------
    weights : str or Path, default=None
        A plain state dict (keys ``conv1.*``, ``stage2.*`` .. ``conv5.*``,
        ``fc.*``) that the user has; loaded with
        ``torch.load(..., weights_only=True)`` and ``strict=True``. Nothing is
        downloaded. None: torchvision's random initialization.
    n_classes : int, default=10
    width : {"x0_5", "x1_0", "x1_5", "x2_0"}, default="x0_5"
        Which torchvision ShuffleNetV2 width.

    Returns
    -------
    model : torchvision.models.ShuffleNetV2
        In evaluation mode. Expects RGB in [0, 1] normalized with
        ``SHUFFLENET_CIFAR_MEAN`` and ``SHUFFLENET_CIFAR_STD``.

    Examples
    --------
    >>> from earlin_sklearn.models import cifar_shufflenet_v2
    >>> net = cifar_shufflenet_v2()
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    import torchvision

    builders = {"x0_5": torchvision.models.shufflenet_v2_x0_5, "x1_0": torchvision.models.shufflenet_v2_x1_0,
                "x1_5": torchvision.models.shufflenet_v2_x1_5, "x2_0": torchvision.models.shufflenet_v2_x2_0}
    if width not in builders:
        raise ValueError(f"width must be one of {sorted(builders)}; got {width!r}.")
    model = builders[width](weights=None, num_classes=n_classes)
    out_channels = model.conv1[0].out_channels
    model.conv1[0] = nn.Conv2d(3, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    return model.eval()
