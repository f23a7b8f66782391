"""
Thresholds that hold: calibrating on held-out ID images
=======================================================

``fit`` sets every detector's threshold on the training images so that
``target_tpr`` of ID inputs are accepted. A score that reads the logits of a
backbone trained on those very images (energy, MSP, max logit) is
over-confident on them, and its threshold then rejects more new ID inputs
than the budget allows. ``calibrate_threshold`` sets the threshold again on
ID images the backbone did not train on (a validation split, or the first
inputs of a deployment known to be ID); no OOD data is involved. Here the
two-stage detector of the edge/cloud guide (EARLIN on the device, the energy
of the logits in the cloud, 95% of ID inputs accepted in all) is fitted on
the digits the CNN was trained on, then calibrated on half of 597 held-out
digits and checked on the other half, for 20 random halvings.
"""

import matplotlib.pyplot as plt
import numpy as np

from earlin_sklearn import ShallowFeatureOODDetector, TwoStageDetector
from earlin_sklearn.datasets import load_digits_images
from earlin_sklearn.models import train_digits_cnn

X, y = load_digits_images()
X = (X - X.mean()) / X.std()
order = np.random.default_rng(0).permutation(len(X))
X_train, y_train, X_held = X[order[:1200]], y[order[:1200]], X[order[1200:]]  # the CNN never saw X_held
model = train_digits_cnn(X_train, y_train)  # stands for your pretrained model

two = TwoStageDetector(ShallowFeatureOODDetector(model, "layer1"), target_tpr=0.95).fit(X_train, y_train)
fit_offset = two.cloud_.offset_
fit_accepts = np.mean(two.predict(X_held) == 1)
print(f"thresholds from fit: {100 * fit_accepts:.1f}% of the held-out digits accepted (target 95%)")

rng = np.random.default_rng(1)
calibrated = []
for _ in range(20):
    half = rng.permutation(len(X_held))
    X_cal, X_check = X_held[half[:298]], X_held[half[298:]]
    two.calibrate_threshold(X_cal)  # 95% of X_cal accepted (to the image) by both stages together
    calibrated.append(np.mean(two.predict(X_check) == 1))
calibrated = np.array(calibrated)
print(f"calibrated on 298 of them: {100 * calibrated.mean():.1f}% of the other 299 accepted on average "
      f"(from {100 * calibrated.min():.1f}% to {100 * calibrated.max():.1f}% over 20 halvings)")

# %%
# Left: the cloud stage's energy score is higher on the training digits than on new ones, so the threshold
# set among the training scores cuts into the bulk of new ones. Right: calibrated thresholds accept 95% of
# new digits on average; a calibration set of about 300 images moves the result by a few points either way.
train_scores, held_scores = two.cloud_.score_samples(X_train), two.cloud_.score_samples(X_held)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9.5, 3.4), gridspec_kw={"width_ratios": [3, 2]})
bins = np.linspace(min(held_scores.min(), fit_offset) - 0.5, train_scores.max() + 0.5, 40)
ax0.hist(train_scores, bins=bins, alpha=0.55, density=True, label="training digits")
ax0.hist(held_scores, bins=bins, alpha=0.55, density=True, label="held-out digits")
ax0.axvline(fit_offset, color="C3", linestyle="--", label="cloud threshold from fit")
ax0.axvline(two.cloud_.offset_, color="C2", label="after calibrate_threshold")
ax0.set(xlabel="energy of the logits (higher = more ID)", ylabel="density", title="Cloud stage scores")
ax0.legend(fontsize=8)
ax1.axhline(95, color="gray", linewidth=1, label="target")
ax1.plot(np.zeros(20), 100 * np.full(20, fit_accepts), "o", color="C3", label="thresholds from fit")
ax1.plot(np.ones(20) + rng.uniform(-0.08, 0.08, 20), 100 * calibrated, "o", color="C2", alpha=0.7,
         label="calibrated (20 halvings)")
ax1.set(xticks=[0, 1], xticklabels=["fit", "calibrated"], xlim=(-0.5, 1.5), ylabel="new ID digits accepted (%)",
        title="Both stages together")
ax1.legend(fontsize=8, loc="lower right")
fig.tight_layout()
plt.show()
