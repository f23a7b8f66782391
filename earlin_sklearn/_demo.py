"""The main job on an embedded default, fully offline.

ID data: scikit-learn's bundled handwritten digits (8x8). A small CNN is
trained on them in seconds; the detector taps its ``layer1`` and is fitted on
the ID training images only. OOD data, all built from what the dependencies
ship: natural-image patches (scikit-learn's two sample photographs), printed
letters (rendered with Pillow's built-in font), Gaussian and uniform noise.
"""

import time

import numpy as np
import torch
from torch import nn

from ._detector import ShallowFeatureOODDetector
from .metrics import auroc, tnr_at_tpr


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


def load_digits_images():
    """Digits as float32 (N, 1, 8, 8) in [0, 1], and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def natural_patches(n, rng):
    """Grayscale 8x8 patches of scikit-learn's sample photographs, in [0, 1]."""
    from sklearn.datasets import load_sample_images

    photos = [img.mean(axis=2) / 255.0 for img in load_sample_images().images]
    out = np.empty((n, 1, 8, 8), dtype=np.float32)
    for i in range(n):
        img = photos[i % len(photos)]
        # a 32x32 crop box-averaged to 8x8: the scale of a digit
        r, c = rng.integers(0, img.shape[0] - 32), rng.integers(0, img.shape[1] - 32)
        out[i, 0] = img[r : r + 32, c : c + 32].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    return out


def printed_letters(n, rng):
    """Capital letters drawn with Pillow's built-in font, 8x8 in [0, 1], randomly shifted."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    glyphs = []
    for ch in "ABCDEFGHJKLMNPQRTUVWXYZ":
        canvas = Image.new("L", (16, 16), 0)
        ImageDraw.Draw(canvas).text((4, 2), ch, fill=255, font=font)
        glyphs.append(np.asarray(canvas, dtype=np.float32) / 255.0)
    out = np.empty((n, 1, 8, 8), dtype=np.float32)
    for i in range(n):
        g = np.roll(glyphs[i % len(glyphs)], rng.integers(-2, 3, size=2), axis=(0, 1))
        small = g.reshape(8, 2, 8, 2).mean(axis=(1, 3))
        out[i, 0] = small / max(small.max(), 1e-6)
    return out


def train_cnn(X, y, epochs=15, seed=0):
    """Train :class:`DigitsCNN` with Adam; a few seconds on 2 CPU cores."""
    torch.manual_seed(seed)
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(Xt), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def run_demo(layer="layer1", seed=0, out=print):
    """Train, fit the detector, and print the results table. Returns the rows."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    X, y = load_digits_images()
    order = rng.permutation(len(X))
    train, test = order[:1200], order[1200:]
    mean, std = X[train].mean(), X[train].std()

    def norm(a):
        return ((a - mean) / std).astype(np.float32)

    net = train_cnn(norm(X[train]), y[train], seed=seed)
    with torch.no_grad():
        acc = (net(torch.from_numpy(norm(X[test]))).argmax(1).numpy() == y[test]).mean()
    t_train = time.perf_counter() - t0

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(norm(X[train])), torch.from_numpy(y[train])),
        batch_size=256,
    )
    detector = ShallowFeatureOODDetector(net, layer=layer, device="cpu").fit(loader)
    s_id = detector.score_samples(norm(X[test]))
    n = len(test)
    ood_sets = {
        "natural photo patches": natural_patches(n, rng),
        "printed letters": printed_letters(n, rng),
        "Gaussian noise": np.clip(rng.normal(X.mean(), X.std(), size=(n, 1, 8, 8)), 0, 1).astype(np.float32),
        "uniform noise": rng.uniform(0, 1, size=(n, 1, 8, 8)).astype(np.float32),
    }
    offset = detector.offset_
    rows = [("ID test digits", n, float("nan"), float("nan"), 100 * float(np.mean(s_id < offset)))]
    for name, X_ood in ood_sets.items():
        s_ood = detector.score_samples(norm(X_ood))
        rows.append((name, len(X_ood), 100 * auroc(s_id, s_ood), 100 * tnr_at_tpr(s_id, s_ood), 100 * float(np.mean(s_ood < offset))))
    elapsed = time.perf_counter() - t0

    out(f"EARLIN demo: digits CNN (test accuracy {100 * acc:.1f}%, trained in {t_train:.1f} s), "
        f"detector on {layer!r} fitted on {len(train)} ID images")
    out(f"{'input set':<24}{'n':>6}{'AUROC %':>10}{'TNR@95TPR %':>13}{'not uploaded %':>16}")
    for name, count, a, t, rej in rows:
        a_s = "-" if np.isnan(a) else f"{a:.1f}"
        t_s = "-" if np.isnan(t) else f"{t:.1f}"
        out(f"{name:<24}{count:>6}{a_s:>10}{t_s:>13}{rej:>16.1f}")
    out(f"(threshold from ID training data only, target TPR 95%; total {elapsed:.1f} s)")
    return {"accuracy": float(acc), "rows": rows, "detector": detector}
