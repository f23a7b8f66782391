"""
Where to cut: a layer sweep under an edge budget
================================================

:func:`~earlin_sklearn.recommend_layer` fits the detector at every candidate
layer on ID folds and scores each with pseudo-OOD made from the held-out fold
(no OOD data), and weighs that against the share of the model's FLOPs the
edge would run. Here the sweep is drawn beside the AUROC against real OOD
sets (photo patches, printed letters), which the choice never sees. Runs
offline in about half a minute.
"""

import matplotlib.pyplot as plt
import numpy as np

from earlin_sklearn import ShallowFeatureOODDetector, recommend_layer
from earlin_sklearn.datasets import load_digits_images, natural_patches, printed_letters
from earlin_sklearn.metrics import auroc
from earlin_sklearn.models import train_digits_cnn

X, y = load_digits_images()
mean, std = X.mean(), X.std()
X = (X - mean) / std
order = np.random.default_rng(0).permutation(len(X))
X, y = X[order], y[order]
model = train_digits_cnn(X[:1200], y[:1200])

# %%
# The recommendation, from ID data only (every layer the edge may run).
rec = recommend_layer(model, X[:1200], y[:1200], layers=["stem", "layer1", "layer2"], max_edge_flops=1.0)
print(rec)

# %%
# For the plot only: each layer's AUROC against real OOD sets.
rng = np.random.default_rng(1)
ood = {"photo patches": (natural_patches(400, rng) - mean) / std,
       "printed letters": (printed_letters(400, rng) - mean) / std}
real = {}
for row in rec.table:
    det = ShallowFeatureOODDetector(model, row["layer"]).fit(X[:1200], y[:1200])
    s_id = det.score_samples(X[1200:])
    real[row["layer"]] = {name: auroc(s_id, det.score_samples(x)) for name, x in ood.items()}

fig, ax = plt.subplots(figsize=(6, 4))
flops = [100 * r["edge_flops"] for r in rec.table]
ax.plot(flops, [100 * r["pseudo_auroc"] for r in rec.table], "o-", label="pseudo-OOD (chooses)")
for name in ood:
    ax.plot(flops, [100 * real[r["layer"]][name] for r in rec.table], "s--", label=f"{name} (reports)")
for r, f in zip(rec.table, flops):
    ax.annotate(r["layer"], (f, 100 * r["pseudo_auroc"]), textcoords="offset points", xytext=(4, -12))
ax.axvline(100 * next(r["edge_flops"] for r in rec.table if r["layer"] == rec.layer), color="k", lw=0.8,
           label=f"recommended: {rec.layer}")
ax.set(xlabel="edge share of the model's FLOPs (%)", ylabel="AUROC (%)", title="AUROC against edge cost")
ax.legend(fontsize=8)
fig.tight_layout()
