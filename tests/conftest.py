"""Tiny seeded backbones and synthetic images: no downloads, no shared data."""

import contextlib
import socket
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

try:  # hypothesis keeps no example database in the checkout (.hypothesis/): a test writes nothing there
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("earlin", database=None)
    _hypothesis_settings.load_profile("earlin")
except ImportError:
    pass

# How close the exported edge's scores are to score_samples: both pool with one function; the head's power
# transform runs in float64 and its whitening in float32 (float64 for a float64 backbone), which keeps about
# 3e-7 relative on the development models.
EDGE_RTOL = 1e-6
# Random-weight models fitted on a few dozen images have pooled features that are constant to 1e-14 of
# their value; standardizing them divides a last-bit difference of ``pow`` (torch's and NumPy's differ in
# about 6% of values) by that spread. Trained models have no such feature (1e-14 relative on the three
# development models), but the random-model tests compare at this looser tolerance.
RANDOM_MODEL_RTOL = 1e-3


class AnyInputNet(nn.Module):
    """Accepts (N, F) or (N, C, H, W) with any C: a fixed (parameter-free) 1x1
    mixing to ``width`` channels, a ReLU (tap ``"act"``), then a small conv head.

    scikit-learn's common checks feed 2-D arrays of varying widths, so the
    first mixing is computed from the input width instead of being learned.
    """

    def __init__(self, width=6):
        super().__init__()
        self.width = width
        self.act = nn.ReLU()
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        if x.dim() == 2:
            x = x[:, :, None, None]
        idx = torch.arange(self.width * x.shape[1], dtype=x.dtype, device=x.device)
        mix = torch.cos(0.7 * idx + 0.3).view(self.width, x.shape[1], 1, 1)
        return self.head(self.act(torch.nn.functional.conv2d(x, mix)))


class AnyInputClassifier(AnyInputNet):
    """:class:`AnyInputNet` with 2-D logits ``(N, 3)``."""

    def __init__(self, width=6):
        super().__init__(width)
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, x):
        return super().forward(x).flatten(1)


class AnyInputLinearClassifier(AnyInputNet):
    """:class:`AnyInputNet` whose logits ``(N, 3)`` come from an ``nn.Linear`` on pooled features (penultimate
    features for :class:`~earlin_sklearn.baselines.EnergyKNNDetector`)."""

    def __init__(self, width=6):
        super().__init__(width)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(super().forward(x).mean((2, 3)))


class TinyCNN(nn.Module):
    """A 3-channel CNN with a stem, two stages and a classifier (like a mini ResNet)."""

    def __init__(self, n_classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_tiny_cnn(seed=0, n_classes=3):
    torch.manual_seed(seed)
    net = TinyCNN(n_classes)
    with torch.no_grad():  # non-trivial BN statistics
        net.stem[1].running_mean.uniform_(-0.1, 0.1)
        net.stem[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def make_images(n=90, n_classes=3, size=12, seed=0):
    """Class-dependent smooth images (N, 3, size, size), float32, with labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin((c + 1) * 3 * xx + c) * np.cos((c + 2) * 2 * yy) for c in range(n_classes)])
    X = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        X[i] = base[y[i]][None] * np.array([1.0, 0.6, 0.3])[:, None, None] + 0.2 * rng.standard_normal((3, size, size))
    return X, y


@pytest.fixture
def tiny_cnn():
    return make_tiny_cnn()


@pytest.fixture
def images():
    return make_images()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_uvicorn(app, port=None, **config):
    """The real server (uvicorn) on a loopback port, in a thread: ``(server, thread, port)`` once it serves."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **{"log_level": "critical", **config}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    return server, thread, port


def stop_uvicorn(server, thread):
    server.should_exit = True
    thread.join(timeout=10)


@contextlib.contextmanager
def uvicorn_running(app, **config):
    """``with uvicorn_running(app) as url:`` the server runs inside the block."""
    server, thread, port = start_uvicorn(app, **config)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_uvicorn(server, thread)


def served_records(two, X, directory):
    """Export ``two`` (a fitted ``TwoStageDetector``) as a ``.pt2`` split under ``directory / "split"``, serve its
    cloud part and run ``X`` through an ``EdgeRunner`` uploading activations: the records, logged to
    ``directory / "log.jsonl"``."""
    from earlin_sklearn import EdgeRunner, save_split
    from earlin_sklearn._server import create_cloud_app

    edge, cloud = two.export_split()
    save_split(edge, cloud, directory / "split", torch.from_numpy(X[:4]), formats=("pt2",))
    with uvicorn_running(create_cloud_app(directory / "split")) as url:
        with EdgeRunner(directory / "split", url, upload="activations") as runner:
            return runner.run(torch.from_numpy(X), log=directory / "log.jsonl")

