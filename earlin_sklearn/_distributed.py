"""Fitting on a Dask cluster: the forward passes run where the data is, only statistics travel."""

import math

import numpy as np
from torch.utils.data import Dataset, Subset

from ._moments import FeatureMoments
from ._optional import require


def _dataset(source):
    """The Dataset itself, or the one a factory makes (on the worker that calls this)."""
    return source if isinstance(source, Dataset) else source()


def _length(source):
    return len(_dataset(source))


def _first_input(source):
    x = _dataset(source)[0]
    x = x[0] if isinstance(x, (tuple, list)) else x
    return np.asarray(x)[None]


def _shard_moments(features, source, start, stop, transform, n_folds, scatter, owner):
    """Statistics of rows ``start:stop`` of the dataset, computed on the worker that runs this."""
    from ._detector import _transform, _with_labels  # the same batch path as a local fit

    moments = FeatureMoments(features._n_features_out, n_folds, scatter=scatter, start=start)
    shard = Subset(_dataset(source), range(start, stop))
    for F, y in _with_labels(features._pooled_batches(shard, owner), None, owner):
        moments.update(F if transform is None else _transform(transform, F), y)
    return moments


class DaskShards:
    """ID training data read in shards by the workers of a Dask cluster.

    Pass it to :meth:`ShallowFeatureOODDetector.fit` in place of the data.
    Each worker runs the frozen edge prefix on its shards (contiguous ranges
    of the dataset's indices) and sends back only mergeable statistics of
    the pooled features (``FeatureMoments``, see ``moments_``);
    the client merges them. The result equals a single-process fit on the
    same dataset (within float rounding): a row's fold and sampling key
    depend on its index, not on the worker that read it.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset or callable
        Indexable data yielding ``x`` or ``(x, y)``. A Dataset is sent to
        each worker once (it should be light: file paths, as
        ``torchvision.datasets.ImageFolder`` holds). A callable without
        arguments that returns the Dataset (for instance
        ``functools.partial(ImageFolder, "/data/train", transform=t)``) is
        called on each worker instead, so nothing but the call travels: the
        images are read from storage the workers see.
    client : distributed.Client, default=None
        The cluster to use; None uses the current client
        (``distributed.get_client()``).
    n_shards : int, default=None
        Number of shards; None gives two per worker thread.

    Examples
    --------
    >>> from distributed import Client, LocalCluster  # doctest: +SKIP
    >>> client = Client(LocalCluster(n_workers=2, threads_per_worker=1))  # doctest: +SKIP
    >>> detector.fit(DaskShards(train_dataset, client=client))  # doctest: +SKIP
    """

    def __init__(self, dataset, *, client=None, n_shards=None):
        self.dataset = dataset
        self.client = client
        self.n_shards = n_shards

    def _client(self):
        (distributed,) = require("Fitting on Dask", "distributed", "distributed")
        return self.client if self.client is not None else distributed.get_client()

    def first_input(self, owner):
        """The first image, as an array of shape (1, C, H, W), read by a worker."""
        client = self._client()
        self._source = client.scatter(self.dataset, broadcast=True) if isinstance(self.dataset, Dataset) else self.dataset
        self._n_rows = int(client.submit(_length, self._source, pure=False).result())
        if self._n_rows == 0:
            raise ValueError(f"{owner} got an empty dataset: it yields no images.")
        return client.submit(_first_input, self._source, pure=False).result()

    def shards(self):
        """``[(start, stop), ...]``: contiguous index ranges covering the dataset."""
        n_shards = self.n_shards
        if n_shards is None:
            n_shards = 2 * max(1, sum(self._client().nthreads().values()))
        size = math.ceil(self._n_rows / max(1, min(n_shards, self._n_rows)))
        return [(s, min(s + size, self._n_rows)) for s in range(0, self._n_rows, size)]

    def pass_runner(self, features, owner):
        """``run_pass(transform, n_folds, scatter) -> FeatureMoments``: one pass, spread over the workers.

        Each pass runs the prefix again on the workers (a fit of more than
        10,000 images with the power transform takes two passes)."""
        client = self._client()
        remote_features = client.scatter(features, broadcast=True)  # the frozen prefix travels once per fit
        shards = self.shards()

        def run_pass(transform, n_folds, scatter, keep=False):
            futures = [client.submit(_shard_moments, remote_features, self._source, start, stop, transform,
                                     n_folds, scatter, owner, pure=False) for start, stop in shards]
            merged = None
            for part in client.gather(futures):  # in shard order, as one process would see the rows
                merged = part if merged is None else merged.merge(part)
            return merged

        run_pass.close = lambda: None
        return run_pass
