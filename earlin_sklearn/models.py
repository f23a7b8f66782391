"""Models: a small CNN for the offline demo (and CIFAR ResNets, see :func:`cifar_resnet`)."""

import torch
from torch import nn


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


def train_digits_cnn(X, y, epochs=15, seed=0):
    """Train :class:`DigitsCNN` with Adam; a few seconds on 2 CPU cores.

    Parameters
    ----------
    X : ndarray of shape (N, 1, 8, 8), float32
        Normalized images.
    y : ndarray of shape (N,), int64
    epochs : int, default=15
    seed : int, default=0

    Returns
    -------
    net : DigitsCNN
        In evaluation mode.
    """
    torch.manual_seed(seed)
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    g = torch.Generator().manual_seed(seed)
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
        :data:`CIFAR_MEAN` and :data:`CIFAR_STD`.
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
