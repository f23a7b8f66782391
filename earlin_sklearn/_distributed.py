"""Fitting on a Dask cluster: the forward passes run where the data is, only statistics travel."""

import contextlib
import hashlib
import math
import os
import pickle

import numpy as np
from torch.utils.data import Dataset, Subset

from ._allocator import glibc
from ._moments import FeatureMoments
from ._passes import accumulate, kept, with_labels
from ._spill import FeatureSpill
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


_WORKER_FEATURES: dict = {}  # per worker process: the frozen prefix of the fits it serves, by digest


def _features_on_worker(blob, digest):
    """The fitted BackboneFeatures pickled in ``blob`` (whose sha256 is ``digest``), unpickled once per worker
    process.

    The client sends immutable bytes, not the object: Dask may copy data from
    one worker to another at any time, and a module copied while a forward
    pass runs on it would carry that pass's temporary hooks.
    """
    if digest not in _WORKER_FEATURES:
        _WORKER_FEATURES.clear()  # one fit at a time: keep one prefix in memory
        _WORKER_FEATURES[digest] = pickle.loads(blob)  # bytes this fit's client made (as Dask's own tasks are)
    return _WORKER_FEATURES[digest]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@contextlib.contextmanager
def roomy_allocator():
    """glibc allocator thresholds for torch's CPU work, for the time of one task, restored afterwards.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to give
    memory back to the system sooner), which also fixes glibc's mmap
    threshold at 128 KiB: every activation buffer of a batch is then mapped
    and unmapped, and torch runs the prefix at half speed (measured in
    ``benchmarks/bench_scale.py``). While a shard runs, the thresholds are
    32 MiB (mmap) and 64 MiB (trim), glibc's own dynamic maxima; afterwards
    Dask's values are set back. Only where that variable is set (so glibc's
    dynamic thresholds are already off and the old state is known) and the C
    library is glibc.
    """
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    libc = glibc() if trim is not None else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    try:
        yield
    finally:
        libc.mallopt(_M_TRIM_THRESHOLD, int(trim))
        libc.mallopt(_M_MMAP_THRESHOLD, int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 128 * 1024)))


_WORKER_SPILLS: dict = {}  # per worker process: (fit digest, shard start) -> FeatureSpill of the first pass


def _shard_moments(blob, digest, source, start, stop, transform, n_folds, scatter, reservoir_size, owner, keep):
    """Statistics of rows ``start:stop`` of the dataset, computed on the worker that runs this.

    ``keep``: write the pooled features to a file in the worker's directory,
    for the next pass. A pass after that reads the file when this worker
    kept one for the shard, and runs the backbone again otherwise.
    """
    with roomy_allocator():
        return _shard_pass(blob, digest, source, start, stop, transform, n_folds, scatter, reservoir_size, owner,
                           keep)


def _shard_pass(blob, digest, source, start, stop, transform, n_folds, scatter, reservoir_size, owner, keep):
    features = _features_on_worker(blob, digest)
    moments = FeatureMoments(features._n_features_out, n_folds, reservoir_size, scatter=scatter, start=start)
    spill_key = (digest, start)
    spill = _WORKER_SPILLS.get(spill_key)
    if spill is not None and not keep:
        return accumulate(moments, spill.batches(), transform)
    batches = with_labels(features._pooled_batches(Subset(_dataset(source), range(start, stop)), owner), None, owner)
    if keep:
        from distributed import get_worker

        path = os.path.join(get_worker().local_directory, f"earlin-{spill_key[0][:16]}-{start}.f64")
        spill = _WORKER_SPILLS[spill_key] = FeatureSpill(path)
        batches = kept(batches, spill)
    return accumulate(moments, batches, transform)


def _drop_spills(digest):
    for key in [k for k in _WORKER_SPILLS if k[0] == digest]:
        _WORKER_SPILLS.pop(key).close()


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
        """``run_pass(transform, n_folds, scatter, keep=False) -> FeatureMoments``: a pass over the workers.

        With ``keep``, each worker also writes its shards' pooled features to
        a file in its directory, and the next pass runs each shard on the
        worker that kept it and reads the file: the backbone runs once per
        image. ``run_pass.close()`` deletes the files.
        """
        from . import _moments

        client = self._client()
        payload = pickle.dumps(features)  # pickled on the CPU by TorchStateMixin
        digest = hashlib.sha256(payload).hexdigest()
        blob = client.scatter(payload, broadcast=True)  # the frozen prefix travels once per fit, as bytes
        shards = self.shards()
        reservoir_size = _moments.RESERVOIR_SIZE  # the client's, so every worker samples alike
        where = {}  # shard start -> the worker that kept its features

        def run_pass(transform, n_folds, scatter, keep=False):
            futures = []
            for start, stop in shards:
                placement = {"workers": [where[start]], "allow_other_workers": True} if start in where else {}
                futures.append(client.submit(_shard_moments, blob, digest, self._source, start, stop, transform,
                                             n_folds, scatter, reservoir_size, owner, keep, pure=False, **placement))
            parts = client.gather(futures)
            if keep:
                holders = client.who_has(futures)
                where.update({start: holders[f.key][0] for (start, _), f in zip(shards, futures) if holders.get(f.key)})
            merged = None
            for part in parts:  # in shard order, as one process would see the rows
                merged = part if merged is None else merged.merge(part)
            return merged

        run_pass.close = lambda: client.run(_drop_spills, digest)
        return run_pass
