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
