"""
Pipeline and GridSearchCV, with and without OOD data
====================================================

The steps are ordinary scikit-learn estimators: compose them in a
``Pipeline`` and tune them with ``GridSearchCV``. Without OOD data,
:func:`~earlin_sklearn.make_pseudo_ood_scorer` scores each candidate on
pseudo-OOD made from the held-out ID fold; with some OOD samples,
:func:`~earlin_sklearn.make_ood_scorer` uses them. Runs offline in about a
minute on 2 CPU cores.
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

# %%
# The two scorers side by side, one point per candidate: pseudo-OOD ranks the
# coarse choices (the layer) as real OOD data does.
fig, ax = plt.subplots(figsize=(5.5, 4))
for layer, marker in (("stem", "o"), ("layer1", "s")):
    rows = [i for i, p in enumerate(search.cv_results_["params"]) if p["layer"] == layer]
    ax.scatter(search.cv_results_["mean_test_score"][rows], search_ood.cv_results_["mean_test_score"][rows],
               marker=marker, label=f"layer={layer}")
ax.set(xlabel="pseudo-OOD AUROC (no OOD data)", ylabel="AUROC against printed letters",
       title="Each candidate, scored both ways")
ax.legend()
fig.tight_layout()
