"""Mergeable statistics of ID feature rows: what every fit accumulates, batch by batch or shard by shard.

A fit never needs the feature rows themselves, only

- per fold and per class: the number of rows and their mean;
- per fold: the within-class scatter matrix (sum of outer products of the
  rows' deviations from their class mean), pooled over classes;
- a bounded sample of rows (a *reservoir*), for the two things no sum gives:
  the fourth-moment term of Ledoit-Wolf shrinkage and the cross-fitted
  threshold (out-of-fold scores).

Counts, means and scatters merge exactly with the pairwise update of Chan,
Golub and LeVeque (1979): a batch, a shard or a fold is summarised on its
own and added, and the deviations are always taken from a mean, never as a
difference of large sums, so the merge is as accurate as the two-pass
formula. Which fold a row belongs to and whether it enters the reservoir
depend only on its position in the stream (a hash of the row index), so
fitting in one batch, in many, or in shards on many workers gives the same
statistics. The reservoir keeps the ``reservoir_size`` rows of smallest hash
key, a uniform sample that merges exactly too; with no more rows than that
it holds them all and every statistic is exact.
"""

import numpy as np
from sklearn.utils.validation import validate_data

RESERVOIR_SIZE = 10_000
"""Rows kept for the threshold and the Ledoit-Wolf term; a fit on more rows estimates those two from a
uniform sample of this size (the standard error of a 95% threshold's acceptance rate is then 0.22 points)."""

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x):
    """The splitmix64 finaliser, vectorised: a well-mixed 64-bit hash of each integer."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (x ^ (x >> np.uint64(31))) & _MASK64


def fold_of(index, n_folds):
    """The fold (``0 .. n_folds - 1``) of each row index: uniform, and the same wherever the row is seen."""
    u = (_splitmix64(2 * np.asarray(index, dtype=np.uint64)) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.minimum((u * n_folds).astype(np.intp), n_folds - 1)


def reservoir_key(index):
    """Sampling key of each row index: the reservoir keeps the rows of smallest key.

    63 bits of the hash, as int64: every array of the statistics is a dtype that
    safetensors files hold (``save_detector``)."""
    return (_splitmix64(2 * np.asarray(index, dtype=np.uint64) + np.uint64(1)) >> np.uint64(1)).astype(np.int64)


class FeatureMoments:
    """Per-fold, per-class counts, means and pooled scatter of feature rows, and a row reservoir.

    Parameters
    ----------
    n_features : int
    n_folds : int, default=1
        Rows are spread over this many folds by a hash of their index (for
        a cross-fitted threshold); 1 keeps them together.
    reservoir_size : int, default=None
        Rows kept as a uniform sample; 0 keeps none; None: ``RESERVOIR_SIZE``.
    scatter : {"full", "diagonal"}, default="full"
        Full scatter matrices, or only their diagonals (per-feature sums of
        squared deviations, enough for channel scores).
    start : int, default=0
        Index of the first row this object sees: a shard starting at row
        ``start`` of the data gets the same folds and keys as in one pass.
    """

    def __init__(self, n_features, n_folds=1, reservoir_size=None, scatter="full", start=0):
        self.n_features = int(n_features)
        self.n_folds = int(n_folds)
        self.reservoir_size = RESERVOIR_SIZE if reservoir_size is None else int(reservoir_size)
        self.scatter_kind = scatter
        self.start = int(start)
        self.n_rows = 0
        self.labelled = None  # unknown until the first rows arrive
        self.labels = []  # class label of each slot, in the order first seen
        shape = (self.n_folds, self.n_features, self.n_features) if scatter == "full" else (self.n_folds, self.n_features)
        self.counts = np.zeros((self.n_folds, 0))
        self.means = np.zeros((self.n_folds, 0, self.n_features))
        self.scatter = np.zeros(shape)
        # the sample: rows, class slots, folds, keys and indices (see _SAMPLE), and candidates not yet merged
        self._sample = (np.zeros((0, self.n_features)), np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp),
                        np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        self._pending = []

    # -- accumulating ---------------------------------------------------------------------------------
    def _slots(self, y, n):
        """Class slot of each row (new labels get new slots); every row is slot 0 without labels."""
        labelled = y is not None
        if self.labelled is None:
            self.labelled = labelled
        elif self.labelled != labelled:
            raise ValueError("Labels were given for some batches and not for others; give y with every batch "
                             "or with none.")
        if not labelled:
            if not self.labels:
                self._add_slots([None])
            return np.zeros(n, dtype=np.intp)
        y = np.asarray(y).reshape(-1)
        values, inverse = np.unique(y, return_inverse=True)
        index = {label: i for i, label in enumerate(self.labels)}
        new = [v.item() if isinstance(v, np.generic) else v for v in values if v not in index]
        if new and self.labels and isinstance(new[0], str) != isinstance(self.labels[0], str):
            raise ValueError(f"Labels such as {new[0]!r} mix with the earlier batches' labels such as "
                             f"{self.labels[0]!r}: give every batch labels of one type (all strings or all numbers).")
        self._add_slots(new)
        index = {label: i for i, label in enumerate(self.labels)}
        return np.array([index[v] for v in values], dtype=np.intp)[inverse.reshape(-1)]

    def _add_slots(self, labels):
        if not labels:
            return
        self.labels.extend(labels)
        k = len(labels)
        self.counts = np.concatenate([self.counts, np.zeros((self.n_folds, k))], axis=1)
        self.means = np.concatenate([self.means, np.zeros((self.n_folds, k, self.n_features))], axis=1)

    def _group_scatter(self, deviations):
        if self.scatter_kind == "full":
            return deviations.T @ deviations
        return np.einsum("ij,ij->j", deviations, deviations)

    def _outer(self, d, weight):
        return weight * np.outer(d, d) if self.scatter_kind == "full" else weight * d * d

    def update(self, X, y=None):
        """Add the rows ``X`` (float64, shape ``(n, n_features)``) with their labels ``y`` (or None)."""
        X = np.asarray(X, dtype=np.float64)
        n = X.shape[0]
        if n == 0:
            return self
        index = self.start + self.n_rows + np.arange(n, dtype=np.int64)
        slot = self._slots(y, n)
        fold = fold_of(index, self.n_folds)
        group = fold * len(self.labels) + slot
        order = np.argsort(group, kind="stable")
        groups, first = np.unique(group[order], return_index=True)
        for g, rows in zip(groups, np.split(order, first[1:])):
            f, s = divmod(int(g), len(self.labels))
            Xg = X[rows]
            m = Xg.shape[0]
            mean_b = Xg.mean(axis=0)
            self._merge_group(f, s, m, mean_b, self._group_scatter(Xg - mean_b))
        self._add_sample(X, slot, fold, reservoir_key(index), index)
        self.n_rows += n
        return self

    def _merge_group(self, f, s, m, mean_b, scatter_b):
        """Chan et al.'s pairwise update of fold ``f``, class slot ``s`` with a group of ``m`` rows."""
        n_a = self.counts[f, s]
        delta = mean_b - self.means[f, s]
        total = n_a + m
        self.scatter[f] += scatter_b + self._outer(delta, n_a * m / total)
        self.means[f, s] += delta * (m / total)
        self.counts[f, s] = total

    def _add_sample(self, rows, slot, fold, key, index):
        """Offer rows to the sample. They wait in a list and are merged once a sample's worth has come:
        copying the growing sample at every batch churned the allocator enough to slow the forward passes."""
        if self.reservoir_size <= 0:
            return
        if self._sample[3].size >= self.reservoir_size:  # full: only rows that beat the largest key kept can enter
            enter = key < self._sample[3].max()
            rows, slot, fold, key, index = rows[enter], slot[enter], fold[enter], key[enter], index[enter]
        if key.size:
            self._pending.append((rows, slot, fold, key, index))
        if sum(p[3].size for p in self._pending) >= self.reservoir_size:
            self._consolidate()

    def _consolidate(self):
        if not self._pending:
            return
        parts = [self._sample, *self._pending]
        merged = [np.concatenate([p[i] for p in parts]) for i in range(5)]
        if merged[3].size > self.reservoir_size:
            keep = np.sort(np.argpartition(merged[3], self.reservoir_size - 1)[: self.reservoir_size])
            merged = [a[keep] for a in merged]
        self._sample, self._pending = tuple(merged), []

    @staticmethod
    def _sample_part(i: int, doc: str) -> property:  # a property factory, used in the class body only
        def get(self):
            self._consolidate()
            return self._sample[i]

        return property(get, doc=doc)

    sample_rows = _sample_part(0, "The sampled feature rows, shape ``(n_sampled, n_features)``.")
    sample_slot = _sample_part(1, "Class slot of each sampled row.")
    sample_fold = _sample_part(2, "Fold of each sampled row.")
    sample_key = _sample_part(3, "Sampling key of each sampled row (the smallest keys are kept).")
    sample_index = _sample_part(4, "Position in the data of each sampled row.")
    del _sample_part

    def __getstate__(self):
        self._consolidate()
        return self.__dict__

    def merge(self, other):
        """Add the statistics of ``other`` (rows of another batch or shard); ``other`` is unchanged."""
        if (other.n_features, other.n_folds, other.scatter_kind) != (self.n_features, self.n_folds, self.scatter_kind):
            raise ValueError("Only statistics of the same features, folds and scatter kind can be merged.")
        if other.n_rows == 0:
            return self
        if self.labelled is None:
            self.labelled = other.labelled
        elif other.labelled is not None and self.labelled != other.labelled:
            raise ValueError("Cannot merge labelled statistics with unlabelled ones.")
        index = {label: i for i, label in enumerate(self.labels)}
        self._add_slots([label for label in other.labels if label not in index])
        index = {label: i for i, label in enumerate(self.labels)}
        slot_map = np.array([index[label] for label in other.labels], dtype=np.intp)
        for f in range(self.n_folds):
            for s_other, s in enumerate(slot_map):
                m = other.counts[f, s_other]
                if m > 0:
                    self._merge_group(f, s, m, other.means[f, s_other], 0.0)  # between-group term only
            self.scatter[f] += other.scatter[f]
        self.n_rows += other.n_rows
        self._add_sample(other.sample_rows, slot_map[other.sample_slot], other.sample_fold, other.sample_key,
                         other.sample_index)
        return self

    # -- reading ----------------------------------------------------------------------------------------
    def class_labels(self):
        """Labels of the classes seen, sorted (as ``np.unique`` sorts them); None without labels."""
        if not self.labelled:
            return None
        return np.array([self.labels[s] for s in self._sorted_slots()])

    def class_counts(self):
        """Rows per class slot, over all folds."""
        return self.counts.sum(axis=0)

    def model(self, exclude_fold=None, pooled=False, columns=None):
        """Statistics of the rows outside ``exclude_fold`` (all rows when None).

        Returns
        -------
        slots : ndarray of int
            Class slots with rows, in sorted-label order (one entry, -1, when ``pooled``).
        counts : ndarray of shape (n_classes,)
        means : ndarray of shape (n_classes, n_columns)
        scatter : ndarray of shape (n_columns, n_columns) or (n_columns,)
            Within-class scatter pooled over the classes (around the one
            mean when ``pooled``).
        """
        folds = [f for f in range(self.n_folds) if f != exclude_fold]
        cols = slice(None) if columns is None else np.asarray(columns)
        counts = self.counts[folds]
        means = self.means[folds][:, :, cols]
        scatter = self.scatter[folds]
        scatter = scatter[:, cols][:, :, cols] if self.scatter_kind == "full" else scatter[:, cols]
        scatter = scatter.sum(axis=0)
        n_slot = counts.sum(axis=0)
        order = self._sorted_slots()
        slots = np.array([s for s in order if n_slot[s] > 0], dtype=np.intp)
        class_means = np.zeros((slots.size, means.shape[2]))
        for i, s in enumerate(slots):
            w = counts[:, s]
            class_means[i] = (w[:, None] * means[:, s]).sum(axis=0) / n_slot[s]
            for j in np.flatnonzero(w):
                scatter = scatter + self._outer(means[j, s] - class_means[i], w[j])
        class_counts = n_slot[slots]
        if pooled:
            mean = (class_counts[:, None] * class_means).sum(axis=0) / class_counts.sum()
            for c, mu in zip(class_counts, class_means):
                scatter = scatter + self._outer(mu - mean, c)
            return np.array([-1]), np.array([class_counts.sum()]), mean[None, :], scatter
        return slots, class_counts, class_means, scatter

    def _sorted_slots(self):
        if not self.labelled:
            return list(range(len(self.labels)))
        return sorted(range(len(self.labels)), key=self.labels.__getitem__)

    def ordered_sample(self):
        """``(rows, labels)`` of the sample in the order of the data (labels None without them)."""
        order = np.argsort(self.sample_index, kind="stable")
        labels = None if not self.labelled else np.array(self.labels)[self.sample_slot[order]]
        return self.sample_rows[order], labels

    def sample(self, exclude_fold=None, only_fold=None, columns=None):
        """Reservoir rows (and their class slots), restricted to or excluding one fold."""
        keep = np.ones(self.sample_key.size, dtype=bool)
        if exclude_fold is not None:
            keep &= self.sample_fold != exclude_fold
        if only_fold is not None:
            keep &= self.sample_fold == only_fold
        rows = self.sample_rows[keep]
        if columns is not None:
            rows = rows[:, np.asarray(columns)]
        return rows, self.sample_slot[keep], np.flatnonzero(keep)


def check_statistics(estimator, fitted_attribute):
    """``partial_fit`` on an estimator fitted without statistics (by an earlier version) would start over."""
    if hasattr(estimator, fitted_attribute) and not hasattr(estimator, "moments_"):
        raise ValueError(f"This {type(estimator).__name__} holds no streaming statistics (fitted by an earlier "
                         "earlin_sklearn, or a step of a ShallowFeatureOODDetector, which keeps them itself): "
                         "partial_fit cannot add to it. Call partial_fit on the detector, or refit with fit.")


class PartialFitMixin:
    """``partial_fit`` for an array step that fits by ``_partial_fit(X, y, reset)`` into its ``moments_``."""

    _fitted_marker: str | None = None  # a fitted attribute: present without ``moments_`` means fitted without statistics

    def partial_fit(self, X, y=None):
        """Add a batch of ID features to the statistics and refit from all the batches seen.

        Batch by batch gives the same result as one ``fit`` on all the rows
        in the same order: the statistics (``moments_``) merge exactly. Give
        labels with every batch or with none.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,), default=None

        Returns
        -------
        self : object
        """
        check_statistics(self, self._fitted_marker)
        first = not hasattr(self, "moments_")
        if first:
            self._validate_params()
        X = validate_data(self, X, reset=first, dtype=np.float64)
        return self._partial_fit(X, y, reset=first)
