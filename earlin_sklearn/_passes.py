"""A pass over ID data: batches of images -> pooled features -> mergeable statistics, here or on a worker."""

import numpy as np
from sklearn.preprocessing import PowerTransformer

from ._yeo_johnson import fitted_power_transformer, yeo_johnson_lambdas, yeo_johnson_transform

from ._inputs import batch_labels, labels_vector
from ._moments import FeatureMoments
from ._spill import FeatureSpill


# A feature whose ID spread is below this fraction of its size is constant as far as float32 can tell:
# standardized, its values would be the rounding of whatever computed it (another convolution library on the
# device, another batch size). That happens to raw pooled features of random weights, and to features whose
# maximum-likelihood Yeo-Johnson exponent is extreme (lambda = -7e4 maps every value to 1/7e4, up to
# underflow). Such features get the identity transform and a scale of at least this fraction of their size,
# so that only a real change moves them. None of the three development models has one.
FEATURE_RESOLUTION = 1e-4


def fit_power_transform(F, solver="scipy", start=None):
    """Yeo-Johnson (standardized) fitted on the ID features ``F``; float32-constant features kept as they are.

    ``solver="newton"`` finds the same maximum-likelihood lambdas for all
    columns at once (:func:`yeo_johnson_lambdas`, from the lambdas ``start``
    when given), several times faster on many columns; ``"scipy"`` is
    scikit-learn's own per-column search.
    """
    if solver == "newton":
        transform = fitted_power_transformer(F, yeo_johnson_lambdas(F, start=start))
    else:
        transform = PowerTransformer(method="yeo-johnson", standardize=True)
        with np.errstate(over="ignore", invalid="ignore"):
            transform.fit(F)
    F = np.asarray(F, dtype=np.float64)
    mean, std = F.mean(axis=0), F.std(axis=0)
    floor = FEATURE_RESOLUTION * np.abs(mean)
    scaler = transform._scaler  # (the transformed features' mean and spread)
    flat = (std <= floor) | (scaler.scale_ <= FEATURE_RESOLUTION * np.abs(scaler.mean_))
    constant = flat & (floor > 0)  # all zeros (a dead channel) stays scikit-learn's: 0 whatever lambda
    if constant.any():
        scale = np.maximum(std, floor)[constant]
        transform.lambdas_[constant] = 1.0  # identity: yeo_johnson(x, 1) == x
        scaler.mean_[constant] = mean[constant]
        scaler.scale_[constant] = scale
        scaler.var_[constant] = scale**2
    return transform


def power_transform(gaussianize, F, owner=None):
    """The fitted Yeo-Johnson transform of features ``F``.

    The same values as ``gaussianize.transform(F)`` (checked in the tests),
    computed for all columns at once (:func:`yeo_johnson_transform`) where
    scikit-learn calls SciPy once per column.

    ``x ** lambda`` can overflow for finite features far outside the ID
    range. In a fit (``owner`` given) that is refused with a clear error; in
    scoring those rows come back as ``inf``, which scores as far from ID as
    can be (the exported edge head answers OOD for them too).
    """
    if gaussianize == "passthrough":
        return F
    if not (isinstance(gaussianize, PowerTransformer) and gaussianize.method == "yeo-johnson"
            and gaussianize.standardize):
        raise TypeError(f"gaussianize must be a fitted PowerTransformer(method='yeo-johnson', standardize=True) or "
                        f"'passthrough'; got {gaussianize!r}.")
    F = np.asarray(F, dtype=np.float64)
    if F.ndim != 2 or F.shape[1] != gaussianize.lambdas_.size:
        raise ValueError(f"The power transform was fitted on {gaussianize.lambdas_.size} features; got an array of "
                         f"shape {F.shape}.")
    scaler = gaussianize._scaler
    with np.errstate(over="ignore", invalid="ignore"):
        G = (yeo_johnson_transform(F, gaussianize.lambdas_) - scaler.mean_) / scaler.scale_
    overflowed = ~np.isfinite(G).all(axis=1)
    if overflowed.any():
        if owner is not None:
            raise ValueError(f"{owner}: the power transform (gaussianize) overflowed on these images' features: "
                             "their activations lie far outside those of the first ID images. Check their "
                             "scale and normalization.")
        G[overflowed] = np.inf
    return G


def with_labels(batches, y, owner):
    """The ``(features, labels)`` batches, with the labels taken from ``y`` (in order) when it is given."""
    if y is None:
        for F, yb in batches:
            yield finite(F, owner), batch_labels(yb, F.shape[0], owner)
        return
    y = labels_vector(y, owner)
    seen = 0
    for F, _ in batches:
        if seen + F.shape[0] > y.shape[0]:
            raise ValueError(f"{owner}: X has more samples than the {y.shape[0]} labels in y.")
        yield finite(F, owner), batch_labels(y[seen: seen + F.shape[0]], F.shape[0], owner)
        seen += F.shape[0]
    if seen != y.shape[0]:
        raise ValueError(f"{owner}: X has {seen} samples but y has {y.shape[0]}.")


def finite(F, owner):
    """ID features must be finite: overflowing activations mean images the model was not made for."""
    if not np.isfinite(F).all():
        raise ValueError(f"{owner}: the backbone's activations overflowed (the pooled features are not finite) "
                         "on ID training images. Scale and normalize the images as the model was trained.")
    return F


def check_label_count(X, y, owner):
    """An array's sample count against its labels', before any forward pass."""
    if y is not None and hasattr(X, "shape"):
        batch_labels(y, X.shape[0], owner)


class LocalPasses:
    """``passes(transform, n_folds, scatter, keep=False) -> FeatureMoments``: a streamed pass over ``X`` here.

    With ``keep``, the pooled features also go to a temporary file as they
    come (:class:`FeatureSpill`); a later pass reads them back instead of
    running the backbone again. Memory stays one batch either way.
    """

    def __init__(self, features, X, y, owner):
        check_label_count(X, y, owner)
        self.features, self.X, self.y, self.owner = features, X, y, owner
        self.spill = None

    def __call__(self, transform, n_folds, scatter, keep=False):
        if self.spill is not None and not keep:
            batches = self.spill.batches()
        else:
            batches = with_labels(self.features._pooled_batches(self.X, self.owner), self.y, self.owner)
            if keep:
                self.spill = FeatureSpill()
                batches = kept(batches, self.spill)
        return accumulate(FeatureMoments(self.features._n_features_out, n_folds, scatter=scatter), batches, transform,
                          self.owner)

    def close(self):
        if self.spill is not None:
            self.spill.close()


def kept(batches, spill):
    for F, y in batches:
        spill.write(F, y)
        yield F, y


def accumulate(moments, batches, transform, owner="ShallowFeatureOODDetector"):
    """Add ``(features, labels)`` batches, power-transformed by ``transform`` when it is not None."""
    for F, y in batches:
        moments.update(F if transform is None else power_transform(transform, F, owner), y)
    return moments
