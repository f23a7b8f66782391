"""
Edge/cloud split: export, run, cost
===================================

Split the model for collaborative inference: export the edge part (the
backbone prefix plus the detector) and the cloud part (the rest), check that
together they compute the whole model, write the deployable files, and see
what the split costs and saves. Runs offline in about 20 seconds; writes the
files to ``./earlin_split/``.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch

from earlin_sklearn import ShallowFeatureOODDetector, collaborative_cost, save_split, split_cost
from earlin_sklearn.datasets import load_digits_images, natural_patches
from earlin_sklearn.metrics import tnr_at_tpr
from earlin_sklearn.models import train_digits_cnn

X, y = load_digits_images()
mean, std = X.mean(), X.std()
X = (X - mean) / std
order = np.random.default_rng(0).permutation(len(X))
X, y = X[order], y[order]
model = train_digits_cnn(X[:1200], y[:1200])
detector = ShallowFeatureOODDetector(model, layer="layer1").fit(X[:1200], y[:1200])

# 1. Split: the edge part (prefix + detector) and the cloud part (the rest).
edge, cloud = detector.export_split()
X_test, y_test = torch.from_numpy(X[1200:]), y[1200:]
X_ood = torch.from_numpy((natural_patches(300, np.random.default_rng(1)) - mean) / std)
with torch.no_grad():
    out = edge(X_test)                            # EdgeOutput(is_id, score, payload)
    logits = cloud(out.payload)                   # what the cloud returns
    assert torch.allclose(logits, model(X_test), atol=1e-5)
print(f"edge accepts {out.is_id.float().mean():.1%} of ID test digits, "
      f"rejects {1 - edge(X_ood).is_id.float().mean():.1%} of photo patches")

# 2. Deployable files: torch.export (.pt2) and ONNX, for the device and for the server.
paths = save_split(edge, cloud, "earlin_split", example_input=X_test[:8])
print("wrote", ", ".join(sorted(p.name for p in paths.values())))

# 3. What the split costs, measured on the test digits.
cost = split_cost(edge, cloud, X_test, y=y_test, backbone=model)
print(cost)

# 4. What collaborative inference saves, for a few OOD fractions of the stream.
tnr = tnr_at_tpr(detector.score_samples(X_test), detector.score_samples(X_ood))
tpr = float(out.is_id.float().mean())
for ood_fraction in (0.1, 0.5):
    print()
    print(collaborative_cost(cost, ood_fraction=ood_fraction, tpr=tpr, tnr=tnr))

# %%
# Bytes uploaded per input and cloud work, against the share of OOD inputs in
# the stream (the cost model of :func:`~earlin_sklearn.collaborative_cost`,
# with this detector's measured TPR and TNR).
fractions = np.linspace(0, 0.9, 10)
runs = [collaborative_cost(cost, ood_fraction=f, tpr=tpr, tnr=tnr) for f in fractions]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
for i, strategy in enumerate(runs[0].strategies):
    ax1.plot(100 * fractions, [r.strategies[i].bytes_per_input for r in runs], label=strategy.name)
    ax2.plot(100 * fractions, [r.strategies[i].cloud_mflops_per_input for r in runs], label=strategy.name)
ax1.set(xlabel="OOD inputs in the stream (%)", ylabel="bytes uploaded per input", title="Upload")
ax2.set(xlabel="OOD inputs in the stream (%)", ylabel="cloud MFLOPs per input", title="Cloud work")
ax1.legend(fontsize=8)
fig.tight_layout()
