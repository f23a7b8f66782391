"""Image inputs: arrays, tensors, torch Datasets and DataLoaders, read as batches."""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


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


def labels_to_numpy(parts):
    """Concatenate per-batch labels; None if any batch had no labels."""
    if not parts or any(p is None for p in parts):
        return None
    return np.concatenate([np.asarray(torch.as_tensor(p).cpu()).reshape(-1) for p in parts])


def n_batches(loader):
    """Number of batches of a loader, or None when it has no length."""
    try:
        return len(loader)
    except TypeError:
        return None
