"""Scorers for GridSearchCV: AUROC against real OOD data, or against pseudo-OOD made from ID data."""

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import auroc

PSEUDO_OOD = ("shuffle", "blur", "noise")


def _as_numpy(X):
    if isinstance(X, torch.Tensor):
        return X.detach().cpu().numpy()
    return np.asarray(X)


class OODScorer:
    """AUROC of an estimator's ``score_samples`` on held-out ID data against fixed OOD data.

    Made by :func:`make_ood_scorer`; a plain class so that it pickles for
    ``GridSearchCV(n_jobs>1)``.
    """

    def __init__(self, X_ood):
        self.X_ood = X_ood

    def __call__(self, estimator, X, y=None):
        return auroc(estimator.score_samples(X), estimator.score_samples(self.X_ood))

    def __repr__(self):
        return f"make_ood_scorer(X_ood of shape {tuple(np.shape(self.X_ood))})"


def make_ood_scorer(X_ood):
    """A scorer for ``GridSearchCV``: AUROC of the held-out ID fold against ``X_ood``.

    Parameters
    ----------
    X_ood : array-like or tensor of shape (N, C, H, W)
        OOD images, in the same format and normalization as the ID data.

    Returns
    -------
    scorer : callable ``scorer(estimator, X, y=None) -> float``
        Higher is better; any estimator with ``score_samples`` (higher = more
        ID) works, including a :class:`~sklearn.pipeline.Pipeline`.

    Examples
    --------
    >>> from sklearn.model_selection import GridSearchCV
    >>> from earlin_sklearn import ShallowFeatureOODDetector, make_ood_scorer
    >>> search = GridSearchCV(ShallowFeatureOODDetector(net, layer="1"),  # doctest: +SKIP
    ...                       {"metric": ["euclidean", "mahalanobis"]},
    ...                       scoring=make_ood_scorer(X_ood), cv=3)
    """
    return OODScorer(X_ood)


def make_pseudo_ood(X, kind, random_state=None):
    """Pseudo-OOD images made from ID images ``X`` of shape (N, C, H, W) or (N, F).

    - ``"shuffle"``: each image's pixel positions permuted at random (the
      same permutation for all its channels). Colour statistics stay, spatial
      structure goes: an input the model has never seen but whose first-order
      statistics look ID, the hard case for a shallow detector.
    - ``"blur"``: a heavy Gaussian blur (sigma = 1/8 of the image side).
      Low frequencies stay, edges and texture go. Images only.
    - ``"noise"``: Gaussian noise with each channel's ID mean and standard
      deviation, like the noise sets of the ODIN benchmark.

    Parameters
    ----------
    X : ndarray or tensor of shape (N, C, H, W) or (N, F)
    kind : {"shuffle", "blur", "noise"}
    random_state : int, RandomState or None

    Returns
    -------
    X_pseudo : ndarray, same shape and float dtype as ``X``

    Examples
    --------
    >>> import numpy as np
    >>> from earlin_sklearn import make_pseudo_ood
    >>> X = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    >>> shuffled = make_pseudo_ood(X, "shuffle", random_state=0)
    >>> shuffled.shape, bool(np.allclose(np.sort(shuffled[0, 0].ravel()), np.sort(X[0, 0].ravel())))
    ((4, 3, 8, 8), True)
    """
    X = _as_numpy(X)
    X = X.astype(X.dtype if np.issubdtype(X.dtype, np.floating) else np.float32)
    rng = np.random.default_rng(random_state if not isinstance(random_state, np.random.RandomState)
                                else random_state.randint(2**31))
    n = X.shape[0]
    flat = X.reshape(n, X.shape[1], -1) if X.ndim > 2 else X.reshape(n, 1, -1)
    if kind == "shuffle":
        perm = np.argsort(rng.random((n, flat.shape[2])), axis=1)
        out = np.take_along_axis(flat, perm[:, None, :], axis=2)
        return out.reshape(X.shape)
    if kind == "noise":
        mean = flat.mean(axis=(0, 2), keepdims=True)
        std = flat.std(axis=(0, 2), keepdims=True)
        return (mean + std * rng.standard_normal(flat.shape)).astype(X.dtype).reshape(X.shape)
    if kind == "blur":
        if X.ndim != 4:
            raise ValueError('Pseudo-OOD "blur" needs images of shape (N, C, H, W).')
        sigma = max(X.shape[2], X.shape[3]) / 8.0
        size = 2 * int(np.ceil(2 * sigma)) + 1
        t = torch.from_numpy(np.ascontiguousarray(X))
        coords = torch.arange(size, dtype=t.dtype) - size // 2
        g = torch.exp(-(coords**2) / (2 * sigma**2))
        g = g / g.sum()
        c = X.shape[1]
        t = F.pad(t, (size // 2,) * 4, mode="replicate")
        t = F.conv2d(t, g.view(1, 1, 1, size).repeat(c, 1, 1, 1), groups=c)
        t = F.conv2d(t, g.view(1, 1, size, 1).repeat(c, 1, 1, 1), groups=c)
        return t.numpy()
    raise ValueError(f"kind must be one of {PSEUDO_OOD}; got {kind!r}.")


class PseudoOODScorer:
    """Mean AUROC of the held-out ID fold against pseudo-OOD made from that fold.

    Made by :func:`make_pseudo_ood_scorer`.
    """

    def __init__(self, kinds=PSEUDO_OOD, random_state=0):
        self.kinds = kinds
        self.random_state = random_state

    def __call__(self, estimator, X, y=None):
        X = _as_numpy(X)
        kinds = [k for k in self.kinds if k != "blur" or X.ndim == 4]
        s_id = estimator.score_samples(X)
        return float(np.mean([
            auroc(s_id, estimator.score_samples(make_pseudo_ood(X, k, self.random_state)))
            for k in kinds
        ]))

    def __repr__(self):
        return f"make_pseudo_ood_scorer(kinds={tuple(self.kinds)}, random_state={self.random_state})"


def make_pseudo_ood_scorer(kinds=PSEUDO_OOD, random_state=0):
    """A scorer for ``GridSearchCV`` that needs no OOD data at all.

    It builds pseudo-OOD inputs from the held-out ID fold itself (see
    :func:`make_pseudo_ood`: pixel shuffling, heavy blur and channel-matched
    Gaussian noise) and returns the mean AUROC of the ID fold against them.
    Each kind removes one property that real ID images have (spatial
    structure, fine detail, any structure at all) while keeping others, so a
    configuration that separates all three reacts to what makes an image ID
    rather than to one shortcut. It is a proxy: it ranks configurations, it
    does not predict the AUROC on real OOD data.

    Parameters
    ----------
    kinds : sequence of {"shuffle", "blur", "noise"}, default=all three
        ``"blur"`` is skipped for non-image (2-D) inputs.
    random_state : int, default=0
        Seed of the pseudo-OOD generation (the same for every candidate).

    Returns
    -------
    scorer : callable ``scorer(estimator, X, y=None) -> float``

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.model_selection import GridSearchCV
    >>> from earlin_sklearn import DistanceDetector, make_pseudo_ood_scorer
    >>> X = np.random.default_rng(0).normal(size=(90, 6))
    >>> search = GridSearchCV(DistanceDetector(), {"metric": ["euclidean", "mahalanobis"]},
    ...                       scoring=make_pseudo_ood_scorer(), cv=3).fit(X)
    >>> sorted(search.best_params_)
    ['metric']
    """
    unknown = set(kinds) - set(PSEUDO_OOD)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {PSEUDO_OOD}; got {kinds!r}.")
    return PseudoOODScorer(tuple(kinds), random_state)
