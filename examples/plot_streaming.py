"""
Streaming: fit batch by batch, with the same result
===================================================

ID training sets are often too large to hold. The detector keeps only
mergeable statistics of the pooled features (per-class counts, means and
scatter, and a bounded sample of rows), so it can be fitted one batch at a
time with ``partial_fit``, or from a DataLoader of any size with ``fit``,
and the result does not depend on how the data was cut. Here a detector
grows batch by batch on the digits CNN of the quick start; after the last
batch it decides exactly as one ``fit`` on all the images does. The same
statistics merge across the workers of a Dask cluster
(:class:`~earlin_sklearn.DaskShards`, see the user guide).
"""

import matplotlib.pyplot as plt
import numpy as np

from earlin_sklearn import ShallowFeatureOODDetector
from earlin_sklearn.datasets import load_digits_images, natural_patches
from earlin_sklearn.metrics import auroc
from earlin_sklearn.models import train_digits_cnn

X, y = load_digits_images()
X = (X - X.mean()) / X.std()
order = np.random.default_rng(0).permutation(len(X))
X_train, y_train, X_test = X[order[:1200]], y[order[:1200]], X[order[1200:]]
X_ood = (natural_patches(500, np.random.default_rng(0)) - X.mean()) / X.std()
model = train_digits_cnn(X_train, y_train)  # stands for your pretrained model

# The power transform is fitted on the first call's images: make it a sample of a few hundred or more.
streamed = ShallowFeatureOODDetector(model, "layer1").partial_fit(X_train[:400], y_train[:400])
seen, accepted, aurocs = [400], [], []
for start in range(400, 1200, 100):
    accepted.append(np.mean(streamed.predict(X_test) == 1))
    aurocs.append(auroc(streamed.score_samples(X_test), streamed.score_samples(X_ood)))
    streamed.partial_fit(X_train[start:start + 100], y_train[start:start + 100])
    seen.append(start + 100)
accepted.append(np.mean(streamed.predict(X_test) == 1))
aurocs.append(auroc(streamed.score_samples(X_test), streamed.score_samples(X_ood)))

# %%
# One fit on all 1,200 images, with the power transform fitted on the same first 400 (``partial_fit`` in
# one call), decides exactly as the batches did.
at_once = ShallowFeatureOODDetector(model, "layer1").partial_fit(X_train[:400], y_train[:400])
at_once.partial_fit(X_train[400:], y_train[400:])
same = np.array_equal(streamed.predict(X_test), at_once.predict(X_test))
print(f"thresholds: {streamed.offset_:.6f} (batches of 100) and {at_once.offset_:.6f} (one call); "
      f"same decisions on the test digits: {same}")
print(f"statistics kept: {streamed.moments_.n_rows} images seen, "
      f"{streamed.moments_.sample_rows.shape[0]} feature rows sampled (at most 10,000)")

fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot(seen, 100 * np.array(accepted), marker="o", label="ID test digits accepted (target 95%)")
ax.plot(seen, 100 * np.array(aurocs), marker="s", label="AUROC against photo patches")
ax.set(xlabel="ID training images seen", ylabel="%", title="The detector as batches arrive", ylim=(85, 101))
ax.legend(loc="lower right")
fig.tight_layout()
plt.show()
