"""
Quick start: fit, decide, look, save
====================================

Fit a shallow-layer OOD detector from a DataLoader of ID images, decide on
new inputs, look at the score distributions and the ROC curve, and save the
detector. Runs offline in a few seconds: a small CNN is trained on
scikit-learn's digits (it stands for your pretrained model), then frozen; the
detector reads only its first layers.
"""

import joblib
import matplotlib.pyplot as plt
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

# %%
# 3. Look: ID test digits score high, photo patches low; the threshold (dashed) was
# set on ID training data only, to accept 95% of it.
s_id, s_ood = detector.score_samples(X_test), detector.score_samples(X_ood)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
bins = np.linspace(min(s_id.min(), np.percentile(s_ood, 1)), s_id.max(), 50)
ax1.hist(s_id, bins=bins, alpha=0.6, label="ID test digits")
ax1.hist(np.clip(s_ood, bins[0], None), bins=bins, alpha=0.6, label="OOD photo patches")
ax1.axvline(detector.offset_, color="k", ls="--", label="threshold")
ax1.set(xlabel="score (higher = more in-distribution)", ylabel="inputs", title="Scores")
ax1.legend()
scores = np.r_[s_id, s_ood]
thresholds = np.sort(np.unique(scores))[::-1]
tpr = [(s_id >= t).mean() for t in thresholds]
fpr = [(s_ood >= t).mean() for t in thresholds]
ax2.plot(fpr, tpr)
ax2.scatter([(s_ood >= detector.offset_).mean()], [(s_id >= detector.offset_).mean()], color="k", zorder=3,
            label="the fitted threshold")
ax2.set(xlabel="OOD accepted (FPR)", ylabel="ID accepted (TPR)", title=f"ROC, AUROC {report['auroc']:.3f}")
ax2.legend(loc="lower right")
fig.tight_layout()

# %%
# 4. Save and reload with joblib: identical scores (load only pickles you made;
# ``save_detector``/``load_detector`` write files whose loading runs no code).
joblib.dump(detector, "detector.joblib")
reloaded = joblib.load("detector.joblib")
assert np.array_equal(reloaded.score_samples(X_test), detector.score_samples(X_test))
print("reloaded detector gives identical scores")
