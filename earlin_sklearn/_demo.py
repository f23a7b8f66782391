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

from ._detector import ShallowFeatureOODDetector
from .datasets import load_digits_images, natural_patches, noise_images, printed_letters
from .metrics import auroc, tnr_at_tpr
from .models import train_digits_cnn


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

    net = train_digits_cnn(norm(X[train]), y[train], seed=seed)
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
        "Gaussian noise": noise_images(n, "gaussian", rng, mean=X.mean(), std=X.std()),
        "uniform noise": noise_images(n, "uniform", rng),
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
