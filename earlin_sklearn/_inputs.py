"""Image inputs: arrays, tensors, torch Datasets and DataLoaders, read as batches."""

import warnings
from collections.abc import Iterator
from numbers import Number

import numpy as np
import torch
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import validate_data
from torch.utils.data import DataLoader, Dataset

from .exceptions import EarlinWarning


def is_torch_data(X):
    """Whether ``X`` is a torch ``Dataset`` or ``DataLoader`` (read batch by batch)."""
    return isinstance(X, (Dataset, DataLoader))


def as_loader(X, batch_size):
    """A DataLoader over ``X``; a DataLoader is returned unchanged."""
    if isinstance(X, DataLoader):
        return X
    return DataLoader(X, batch_size=batch_size, shuffle=False)


def split_batch(batch):
    """Return ``(x, y)`` from a batch that is ``x``, ``(x,)`` or ``(x, y, ...)``.

    ``y`` is None when the batch carries no labels.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(batch), None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if isinstance(x, torch.Tensor):
            return x, y
    raise TypeError(
        "Each batch must be a tensor `x` or a tuple/list `(x, y)` with `x` a tensor "
        f"of shape (N, C, H, W); got a batch of type {type(batch).__name__}."
    )


def first_input(X, batch_size, owner="The estimator"):
    """The first input of a Dataset or DataLoader, as an array of shape (1, ...)."""
    try:
        batch = next(iter(as_loader(X, batch_size)))
    except StopIteration:
        raise ValueError(f"{owner} got an empty {type(X).__name__}: it yields no images.") from None
    x, _ = split_batch(batch)
    if x.shape[0] == 0:
        raise ValueError(f"{owner} got an empty first batch: the data has no images.")
    return x[:1].detach().cpu().numpy()


def _labels_array(p):
    if isinstance(p, torch.Tensor):
        return p.detach().cpu().numpy().reshape(-1)
    return np.asarray(p).reshape(-1)  # a list of str (a Dataset's class names) stays str


def labels_to_numpy(parts):
    """Concatenate per-batch labels; None if any batch had no labels."""
    if not parts or any(p is None for p in parts):
        return None
    return np.concatenate([_labels_array(p) for p in parts])


def check_labels(y):
    """Refuse labels that are not classes (continuous, multilabel...), as scikit-learn's
    ``check_classification_targets`` does, without its many-classes warning: degenerate class
    counts are judged once all batches are in (``labels_usable``)."""
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise ValueError("Input y contains NaN: every image needs a class label.")
    kind = type_of_target(y, input_name="y")
    if kind not in ("binary", "multiclass", "multiclass-multioutput", "multilabel-indicator"):
        raise ValueError(f"Unknown label type: {kind}. Class labels must be integers or strings, one per image.")
    if kind in ("multiclass-multioutput", "multilabel-indicator"):
        raise ValueError(f"Got {kind} labels; give one class label per image.")


def labels_vector(y, owner):
    """``y`` as a 1-D array: one class label per image (a column vector is accepted)."""
    y = np.asarray(y)
    if y.ndim > 1 and y.size != y.shape[0]:
        raise ValueError(f"{owner}: y must hold one class label per image (shape (N,)); got shape {y.shape}. "
                         "One-hot labels: pass y.argmax(axis=1).")
    return y.reshape(-1)


def batch_labels(y, n, owner):
    """The labels of a batch of ``n`` rows as a checked 1-D array (None stays None)."""
    if y is None:
        return None
    y = labels_vector(y, owner)
    if y.shape[0] != n:
        raise ValueError(f"{owner}: X has {n} samples but y has {y.shape[0]}.")
    check_labels(y)
    return y


def warn_integer_pixels(dtype, stacklevel):
    """The one warning for integer images (uint8, int32, ...), from the array path and the loader path alike."""
    warnings.warn(
        f"Got {str(dtype).replace('torch.', '')} images: their integer pixels are fed to the model as floats "
        "(e.g. in [0, 255]). Scale and normalize them as the model was trained.",
        EarlinWarning,
        stacklevel=stacklevel + 1,
    )


def check_image_shape(shape, owner, index, input_shape):
    """Refuse images whose (C, H, W) differ from those seen in ``fit``."""
    if tuple(shape) != tuple(input_shape):
        raise ValueError(
            f"{owner} was fitted on images of shape {tuple(input_shape)} (C, H, W) but batch {index} has "
            f"images of shape {tuple(shape)}. Resize (and normalize) inputs as for fit."
        )


def check_rank_and_channels(shape, owner, input_shape):
    """Refuse arrays whose rank or channel axis differ from the fitted images', with a hint.

    Only for images (``input_shape`` of 2 or more axes); flat inputs are left to scikit-learn's check.
    """
    if len(input_shape) < 2:
        return
    expected = (len(input_shape) + 1, input_shape[0])
    if len(shape) == len(input_shape) and tuple(shape) == tuple(input_shape):
        raise ValueError(f"{owner} takes a batch of images (N, {', '.join(map(str, input_shape))}); got one image "
                         f"of shape {tuple(shape)}: add a batch axis, X[None].")
    if len(shape) != expected[0]:
        raise ValueError(f"{owner} takes images of shape (N, {', '.join(map(str, input_shape))}); got a "
                         f"{len(shape)}-D array of shape {tuple(shape)}.")
    if shape[1] != expected[1]:
        hint = " It looks channels-last (N, H, W, C): use X.transpose(0, 3, 1, 2)." if shape[-1] == expected[1] else ""
        raise ValueError(f"X has {shape[1]} features (channels), but {owner} is expecting {expected[1]} features as "
                         f"input: it was fitted on images with {expected[1]} channels (N, C, H, W); got shape "
                         f"{tuple(shape)}.{hint}")


def check_batch(x, owner, index, input_shape):
    """A loader's batch: the fitted image shape, no NaN/inf; integer pixels warn."""
    check_rank_and_channels(tuple(x.shape), owner, tuple(input_shape))
    check_image_shape(x.shape[1:], owner, index, input_shape)
    if not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool:
        warn_integer_pixels(x.dtype, stacklevel=4)
    elif x.is_floating_point() and not torch.isfinite(x).all():
        raise non_finite_images(owner, bool(torch.isnan(x).any()), f" (batch {index})")


def n_batches(loader):
    """Number of batches of a loader, or None when it has no length."""
    try:
        return len(loader)
    except TypeError:
        return None


def image_batches(X, batch_size):
    """``(batches, total)``: ``(x, y)`` pairs over an array or a Dataset/DataLoader.

    ``y`` is None for arrays. ``total`` is the number of batches, or None.
    """
    if is_torch_data(X):
        loader = as_loader(X, batch_size)
        return (split_batch(b) for b in loader), n_batches(loader)
    starts = range(0, X.shape[0], batch_size)
    return ((X[s : s + batch_size], None) for s in starts), len(starts)


def non_finite_images(owner, has_nan, where=""):
    """The error for images with NaN or infinite pixels (arrays and loader batches alike)."""
    return ValueError(f"{owner} got images containing {'NaN' if has_nan else 'infinity'}{where}: every pixel must be "
                      "a finite number (drop those images, or replace the missing pixels before passing them).")


def refuse_iterators(estimator, X):
    """A generator or iterator of images cannot be read twice (nor its length known): say what to pass instead."""
    if isinstance(X, Iterator):
        raise ValueError(f"{type(estimator).__name__} got a {type(X).__name__} of images, which can be read only "
                         "once: pass an array (np.stack(list(images))), a torch Dataset or a DataLoader (an "
                         "IterableDataset streams).")


def validate_images(estimator, X, reset, input_shape=None):
    """Validate an image array (or tensor) ``(N, C, H, W)`` with scikit-learn's checks.

    Sets or checks ``n_features_in_`` (the number of channels) on ``estimator``.
    With ``input_shape`` (``(C, H, W)`` seen in fit), an array of another
    rank or channel count is refused in image terms first.
    """
    if isinstance(X, torch.Tensor):
        if X.is_floating_point() and X.dtype not in (torch.float16, torch.float32, torch.float64):
            X = X.float()  # bfloat16 (and float8) have no numpy type; float32 holds them exactly
        X = X.detach().cpu().numpy()
    refuse_iterators(estimator, X)
    if input_shape is not None:
        shape = X.shape if hasattr(X, "shape") else np.asarray(X).shape
        check_rank_and_channels(tuple(shape), type(estimator).__name__, tuple(input_shape))
    X = validate_data(estimator, X, reset=reset, allow_nd=True, dtype="numeric", ensure_all_finite=False)
    # a float64 sum of float32 pixels is finite exactly when every pixel is; a float64 one may overflow: then look
    if X.dtype.kind == "f" and not np.isfinite(np.sum(X, dtype=np.float64)) and not np.isfinite(X).all():
        raise non_finite_images(type(estimator).__name__, bool(np.isnan(X).any()))
    if X.dtype.kind in "iu":
        warn_integer_pixels(X.dtype, stacklevel=3)
    return X


def to_model_input(x, device, dtype):
    """A batch as a tensor on ``device`` in ``dtype``, never sharing memory with ``x`` (the caller's data)."""
    from ._torch import to_device

    if isinstance(x, np.ndarray) and (not x.flags.writeable or any(st < 0 for st in x.strides)):
        x = x.copy()  # torch refuses to wrap read-only memory (e.g. a memmap) or negative strides (X[::-1])
    source = torch.as_tensor(x)
    t = to_device(source, device, dtype)
    if t.device == source.device and t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        t = t.clone()  # a backbone may edit its input in place (an inplace first op): never the caller's images
    return t


def validate_fit_images(estimator, X, batch_size):
    """Validate the images given to ``fit``: ``(X, first input of shape (1, ...))``.

    Sets ``n_features_in_`` (channels) for a Dataset or DataLoader too, from
    its first batch.
    """
    if is_torch_data(X):
        sample = first_input(X, batch_size, type(estimator).__name__)
        estimator.n_features_in_ = int(sample.shape[1]) if sample.ndim > 1 else 1
        return X, sample
    if X is None or isinstance(X, (Number, str, bytes)) or getattr(X, "ndim", None) == 0:
        raise ValueError(f"{type(estimator).__name__}.fit takes ID images, an array or tensor of shape "
                         f"(N, C, H, W), a torch Dataset or a DataLoader; got {type(X).__name__} {X!r:.40}.")
    X = validate_images(estimator, X, reset=True)
    return X, X[:1]
