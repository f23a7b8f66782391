"""
Pipeline and GridSearchCV, with and without OOD data
====================================================

The steps are ordinary scikit-learn estimators: compose them in a
``Pipeline`` and tune them with ``GridSearchCV``. Without OOD data,
:func:`~earlin_sklearn.make_pseudo_ood_scorer` scores each candidate on
pseudo-OOD made from the held-out ID fold; with some OOD samples,
:func:`~earlin_sklearn.make_ood_scorer` uses them. The pseudo-OOD scorer
saturates near 100% for every reasonable candidate, so it is a guard against
bad ones, not a ranking of good ones;
:func:`~earlin_sklearn.held_out_class_auroc` (refit without whole classes,
score them as the OOD) still separates them, with ID data only. Runs
offline in about a minute on 2 CPU cores.
"""

import matplotlib.pyplot as plt
import numpy as np
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from earlin_sklearn import (
    BackboneFeatures,
    ChannelSelector,
    DistanceDetector,
    ShallowFeatureOODDetector,
    held_out_class_auroc,
    make_ood_scorer,
    make_pseudo_ood_scorer,
)
from earlin_sklearn.datasets import load_digits_images, printed_letters
from earlin_sklearn.models import train_digits_cnn

X, y = load_digits_images()
mean, std = X.mean(), X.std()
X = (X - mean) / std
order = np.random.default_rng(0).permutation(len(X))
X, y = X[order], y[order]
model = train_digits_cnn(X[:1200], y[:1200])
X_id = X[:1200]

# The steps are ordinary scikit-learn estimators: put a scaler between them if you like.
pipe = Pipeline([
    ("features", BackboneFeatures(model, layer="layer1")),
    ("scale", StandardScaler()),
    ("select", ChannelSelector(n_channels=16)),
    ("distance", DistanceDetector(metric="euclidean")),
])
pipe.fit(X_id, y[:1200])
print("pipeline accepts", np.mean(pipe.predict(X[1200:]) == 1), "of the ID test digits")

# Tune without any OOD data: pseudo-OOD (pixel shuffling, blur, noise) made from each held-out fold.
grid = {"layer": ["stem", "layer1"], "n_channels": [1, 2, "all"], "metric": ["euclidean", "mahalanobis"]}
search = GridSearchCV(ShallowFeatureOODDetector(model, layer="layer1"), grid,
                      scoring=make_pseudo_ood_scorer(), cv=3, n_jobs=2)
search.fit(X_id)
print("best without OOD data:", search.best_params_, round(search.best_score_, 4))
for params, score in sorted(zip(search.cv_results_["params"], search.cv_results_["mean_test_score"]),
                            key=lambda item: -item[1]):
    print(f"  {score:.4f}  {params}")

# When some real OOD samples are at hand, score candidates by AUROC against them.
X_ood = (printed_letters(300, np.random.default_rng(0)) - mean) / std
search_ood = GridSearchCV(ShallowFeatureOODDetector(model, layer="layer1"), grid,
                          scoring=make_ood_scorer(X_ood), cv=3, n_jobs=2)
search_ood.fit(X_id)
print("best with OOD data:   ", search_ood.best_params_, round(search_ood.best_score_, 4))

# Without OOD data, and without saturation: refit each candidate without groups of digit classes (five folds)
# and score the left-out digits as the OOD.
params = search.cv_results_["params"]
held_out = np.array([held_out_class_auroc(ShallowFeatureOODDetector(model, **p), X_id, y[:1200]).mean()
                     for p in params])
print("best by held-out classes:", params[int(np.argmax(held_out))], round(held_out.max(), 4))

# %%
# Each candidate scored three ways, one point per candidate. Pseudo-OOD ranks
# the coarse choices (one or two channels against all of them) as the printed
# letters do, then saturates: the four candidates that keep all channels score
# 98-100% on pseudo-OOD and 99.8-100% on the letters. Held-out digit classes
# spread those four out (65-100%), which the letters, too easy an OOD set
# here, cannot confirm or refute. It is no guard on its own: it rates the
# stem's two-channel candidates near chance (52-54%) though the letters find
# them at 99.6%, because it measures class structure, which a stem has little
# of. Use pseudo-OOD as the guard and held-out classes to choose among the
# candidates the guard lets through.
real = search_ood.cv_results_["mean_test_score"]
fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), sharey=True)
for ax, scores, name in ((axes[0], search.cv_results_["mean_test_score"], "pseudo-OOD AUROC"),
                         (axes[1], held_out, "held-out-class AUROC")):
    for layer, marker in (("stem", "o"), ("layer1", "s")):
        rows = [i for i, p in enumerate(params) if p["layer"] == layer]
        ax.scatter(scores[rows], real[rows], marker=marker, label=f"layer={layer}")
    ax.set(xlabel=f"{name} (no OOD data)", title=name.split(" AUROC")[0])
axes[0].set_ylabel("AUROC against printed letters")
axes[0].legend()
fig.tight_layout()
