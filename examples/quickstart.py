"""Quickstart: fit a shallow-layer OOD detector from a DataLoader, use it, save it.

Runs offline in a few seconds: a small CNN is trained on scikit-learn's digits,
then frozen; the detector only reads its first layers.
"""

import joblib
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from earlin_sklearn import ShallowFeatureOODDetector
from earlin_sklearn.datasets import load_digits_images, natural_patches
from earlin_sklearn.metrics import ood_report
from earlin_sklearn.models import train_digits_cnn

X, y = load_digits_images()
X = (X - X.mean()) / X.std()
order = np.random.default_rng(0).permutation(len(X))
X_train, y_train, X_test = X[order[:1200]], y[order[:1200]], X[order[1200:]]
model = train_digits_cnn(X_train, y_train)  # stands for your pretrained model

# 1. Fit on in-distribution data only: a DataLoader of (x, y) batches.
id_loader = DataLoader(TensorDataset(torch.from_numpy(X_train), torch.from_numpy(y_train)), batch_size=128)
detector = ShallowFeatureOODDetector(backbone=model, layer="layer1")
detector.fit(id_loader)

# 2. Decide: +1 = in-distribution (send to the cloud), -1 = OOD (reject on the edge).
X_ood = (natural_patches(500, np.random.default_rng(0)) - X.mean()) / X.std()
print("ID test accepted:", np.mean(detector.predict(X_test) == 1))
print("OOD rejected:    ", np.mean(detector.predict(X_ood) == -1))
report = ood_report(detector.score_samples(X_test), detector.score_samples(X_ood))
print({k: round(v, 4) for k, v in report.items()})

# 3. Save and reload with joblib: identical scores.
joblib.dump(detector, "detector.joblib")
reloaded = joblib.load("detector.joblib")
assert np.array_equal(reloaded.score_samples(X_test), detector.score_samples(X_test))
print("reloaded detector gives identical scores")
