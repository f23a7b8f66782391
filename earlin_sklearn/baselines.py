"""Standard OOD detectors, with the same estimator API, to compare EARLIN against.

- :class:`LogitDetector`: scores from the whole model's logits: maximum
  softmax probability (MSP, Hendrycks & Gimpel 2017), energy (Liu et al.
  2020), ODIN (Liang et al. 2018, fixed temperature and step, no tuning on
  OOD data) and maximum logit.
- :class:`KNNDetector`: distance to the k-th nearest ID training feature
  (Sun et al. 2022); on L2-normalized penultimate features it is the KNN
  baseline, and it composes after :class:`~earlin_sklearn.BackboneFeatures` at any layer.
- :class:`EnergyKNNDetector`: the sum of energy and KNN on the penultimate
  features, each standardized on the training data: one forward pass gives
  both, and on CIFAR-100 it led every single full-model score on the three
  development models (``benchmarks/explore_cloud_scores.py``). A cloud stage
  of :class:`~earlin_sklearn.TwoStageDetector` (``cloud_method="energy+knn"``).
- Mahalanobis on penultimate features (Lee et al. 2018, without input
  preprocessing or layer ensembles) is
  ``ShallowFeatureOODDetector(model, layer=<penultimate>, metric="mahalanobis")``.

All follow the package's conventions: ``score_samples`` higher = more ID,
``offset_`` accepts ``target_tpr`` of the ID training data, ``predict`` in
{+1, -1}.
"""

import warnings
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.neighbors import NearestNeighbors
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm

from ._torch import TorchStateMixin, frozen_copy, input_dtype, resolve_device, torch_threads
from ._inputs import image_batches, is_torch_data, to_model_input, validate_fit_images, validate_images
from ._threshold import ThresholdMixin, offset_for_tpr
from ._typing import fit_context
from .exceptions import EarlinWarning

LOGIT_SCORES = ("msp", "energy", "odin", "maxlogit")


def energy_knn_score(logits, features, bank, k, standardization):
    """Energy plus KNN, each standardized, in float64: the one formula of :class:`EnergyKNNDetector` and the
    exported cloud stage.

    ``bank``: the L2-normalized training features ``(n, d)``; the KNN term is
    minus the Euclidean distance of the normalized ``features`` to their
    ``k``-th nearest row of it, ranked by cosine similarity and measured
    directly (``2 - 2 cos`` would lose the digits of near neighbours);
    ``standardization``: ``(energy mean, energy std, knn mean, knn std)``.
    """
    return standardized_sum(*energy_knn_terms(logits, features, bank, k), standardization)


def energy_knn_terms(logits, features, bank, k):
    """``(energy, knn)`` in float64, unstandardized: :func:`logit_score`'s energy and minus the distance of the
    normalized ``features`` to their ``k``-th nearest ``bank`` row."""
    query = F.normalize(features.to(bank.dtype), dim=1)
    return logit_score(logits, "energy"), -kth_neighbour_distance(query, bank, k)


def standardized_sum(energy, knn, standardization):
    """``(energy - mean) / std + (knn - mean) / std`` with ``standardization = (energy mean, std, knn mean, std)``."""
    s = torch.as_tensor(standardization).to(torch.float64)
    return (energy - s[0]) / s[1] + (knn - s[2]) / s[3]


def kth_neighbour_distance(query, bank, k):
    """Euclidean distance (float64) of each normalized ``query`` row to its ``k``-th most similar ``bank`` row."""
    index = torch.topk(query @ bank.T, k, dim=1).indices[:, k - 1]
    return torch.linalg.vector_norm((query - bank[index]).to(torch.float64), dim=1)


def classifier_outputs(model, x, classifier=None):
    """``(logits, features, classifier)``: ``model(x)``, the input of the linear layer that computed it, and that
    layer's name (found, when ``classifier`` is None, as the ``nn.Linear`` whose output the model returns)."""
    seen = {}
    modules = ([(classifier, model.get_submodule(classifier))] if classifier is not None else
               [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)])

    def record(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            seen.setdefault(id(output), (name, inputs[0], output))  # kept alive, so no later tensor takes its id
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in modules]
    try:
        with torch.inference_mode():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or seen.get(id(logits), (0, 0, None))[2] is not logits:
        raise ValueError("EnergyKNNDetector reads the penultimate features, the input of the nn.Linear layer whose "
                         "output the model returns as its logits (N, classes); this model's output is not such a "
                         "layer's. Pass a classifier whose forward() ends with its linear layer.")
    name, features, _ = seen[id(logits)]
    return logits, features.flatten(1), name


def logit_score(logits, method, temperature=1.0):
    """Score of ``(N, classes)`` logits, higher = more ID, in float64: the one formula of each logit method.

    ``"energy"``: T * logsumexp(logits / T); ``"msp"`` and ``"odin"`` (whose
    input perturbation happens before the logits): max softmax(logits / T);
    ``"maxlogit"``: the largest logit. Used by :class:`LogitDetector` and by
    the exported cloud stage (:class:`~earlin_sklearn.CloudHead`).
    """
    z = logits.to(torch.float64)
    if method == "energy":
        return temperature * torch.logsumexp(z / temperature, dim=1)
    if method in ("msp", "odin"):
        return torch.softmax(z / temperature, dim=1).amax(dim=1)
    if method == "maxlogit":
        return z.amax(dim=1)
    raise ValueError(f"method must be one of {LOGIT_SCORES}; got {method!r}.")


class LogitDetector(TorchStateMixin, ThresholdMixin, OutlierMixin, BaseEstimator):
    """OOD scores from a classifier's logits: MSP, energy, ODIN or max logit.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier returning logits ``(N, n_classes)``. Copied and frozen.
    method : {"msp", "energy", "odin", "maxlogit"}, default="msp"
        ``"msp"``: max softmax(logits / T); ``"energy"``: T * logsumexp(logits / T);
        ``"odin"``: MSP at temperature T after one input-perturbation step of
        size ``epsilon`` that raises the predicted class's probability;
        ``"maxlogit"``: the largest logit.
    temperature : float, default=None
        T; None: 1000 for ODIN, 1 otherwise.
    epsilon : float, default=0.0014
        ODIN perturbation size (in the units of ``input_std``).
    input_std : sequence of float, default=None
        Per-channel standard deviation of the input normalization: the ODIN
        gradient is divided by it, so that ``epsilon`` is a step in [0, 1]
        pixel units as in the ODIN paper.
    target_tpr : float, default=0.95
    batch_size : int, default=128
    device : str or torch.device, default="auto"
    n_threads : int, "auto" or None, default="auto"
        torch intra-op threads while scoring (see :class:`~earlin_sklearn.BackboneFeatures`).
    verbose : int, default=0

    Attributes
    ----------
    model_ : torch.nn.Module
    offset_ : float
    n_features_in_ : int

    Examples
    --------
    >>> import torch
    >>> from earlin_sklearn.baselines import LogitDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32).numpy()
    >>> energy = LogitDetector(cifar_resnet(20), "energy", device="cpu").fit(X)
    >>> round(float((energy.predict(X) == 1).mean()), 2)  # the threshold accepts 95% of the ID data
    0.95
    """

    _torch_modules = ("model_",)
    _torch_param = ("model", "model_")

    _parameter_constraints = {
        "model": [torch.nn.Module],
        "method": [StrOptions(set(LOGIT_SCORES))],
        "temperature": [Interval(Real, 0, None, closed="neither"), None],
        "epsilon": [Interval(Real, 0, None, closed="left")],
        "input_std": ["array-like", None],
        "target_tpr": [Interval(Real, 0, 1, closed="right")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "n_threads": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"}), None],
        "verbose": ["verbose"],
    }

    def __init__(self, model, method="msp", *, temperature=None, epsilon=0.0014, input_std=None,
                 target_tpr=0.95, batch_size=128, device="auto", n_threads="auto", verbose=0):
        self.model = model
        self.method = method
        self.temperature = temperature
        self.epsilon = epsilon
        self.input_std = input_std
        self.target_tpr = target_tpr
        self.batch_size = batch_size
        self.device = device
        self.n_threads = n_threads
        self.verbose = verbose

    @fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Set the threshold on ID training data (nothing else is fitted).

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader
        y : ignored

        Returns
        -------
        self : object
        """
        X, _ = validate_fit_images(self, X, self.batch_size)
        self.device_ = resolve_device(self.device)
        self.model_ = frozen_copy(self.model, self.device_)
        self.offset_ = offset_for_tpr(self._scores(X), self.target_tpr)
        return self

    def score_samples(self, X):
        """Higher = more in-distribution.

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader

        Returns
        -------
        scores : ndarray of shape (N,)
        """
        check_is_fitted(self)
        if not is_torch_data(X):
            X = validate_images(self, X, reset=False)
        return self._scores(X)

    def _scores(self, X):
        batches, total = image_batches(X, self.batch_size)
        with torch_threads(getattr(self, "n_threads", "auto")):
            out = [self._score_batch(x) for x, _ in tqdm(batches, total=total, desc=self.method,
                                                         disable=self.verbose <= 0)]
        if not out:
            raise ValueError("Found no images: the data is empty.")
        return np.concatenate(out).astype(np.float64)

    def _score_batch(self, x):
        x = to_model_input(x, self.device_, input_dtype(self.model_))
        T = self.temperature if self.temperature is not None else (1000.0 if self.method == "odin" else 1.0)
        if self.method == "odin":
            x = self._odin_perturb(x, T)
        with torch.inference_mode():
            logits = self.model_(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = f"a tensor of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"{type(self).__name__} scores the model's logits, a tensor (N, classes); the model returns "
                             f"{got}. Pass a classifier, or use ShallowFeatureOODDetector on a layer of this model.")
        return logit_score(logits, self.method, T).cpu().numpy()

    def _odin_perturb(self, x, T):
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model_(x) / T
            F.cross_entropy(logits, logits.argmax(dim=1)).backward()
        step = torch.sign(x.grad)
        if self.input_std is not None:
            std = torch.as_tensor(np.asarray(self.input_std, dtype=np.float64), dtype=x.dtype, device=x.device)
            step = step / std.view(1, -1, *([1] * (x.dim() - 2)))
        return (x - self.epsilon * step).detach()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.target_tags.required = False
        return tags


class EnergyKNNDetector(TorchStateMixin, ThresholdMixin, OutlierMixin, BaseEstimator):
    """Energy plus KNN on the penultimate features, each standardized on the ID training data.

    One forward pass gives both: the logits (energy, Liu et al. 2020) and the
    input of the classifier layer (KNN on L2-normalized features, Sun et al.
    2022, against a bank of the training images' features). Each term is
    standardized by its mean and standard deviation on the training images
    (the KNN term leave-one-out), so neither dominates. Nothing is trained;
    no OOD data is read.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier whose ``forward`` returns the output of an
        ``nn.Linear`` layer (the logits). Copied and frozen.
    k : int, default=10
        Which neighbour; capped at ``n_samples - 1`` (with a warning).
    target_tpr : float, default=0.95
    batch_size : int, default=128
    device : str or torch.device, default="auto"
    n_threads : int, "auto" or None, default="auto"
        torch intra-op threads while scoring (see :class:`~earlin_sklearn.BackboneFeatures`).
    verbose : int, default=0

    Attributes
    ----------
    model_ : torch.nn.Module
    classifier_ : str
        The name of the linear layer whose input is the feature.
    bank_ : ndarray of shape (n_samples, n_penultimate), float32
        The training images' L2-normalized penultimate features.
    n_neighbors_ : int
        The ``k`` actually used.
    standardization_ : ndarray of shape (4,)
        Energy mean and standard deviation, KNN mean and standard deviation,
        on the training images.
    offset_ : float
    n_features_in_ : int

    Examples
    --------
    >>> import torch
    >>> from earlin_sklearn.baselines import EnergyKNNDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32).numpy()
    >>> det = EnergyKNNDetector(cifar_resnet(20), k=5, device="cpu").fit(X)
    >>> det.classifier_, det.bank_.shape
    ('linear', (40, 64))
    >>> # the threshold accepts 95% of the training images scored leave-one-out; scored with
    >>> # themselves in the bank, they score higher
    >>> bool((det.predict(X) == 1).mean() >= 0.95)
    True
    """

    _torch_modules = ("model_",)
    _torch_param = ("model", "model_")

    _parameter_constraints = {
        "model": [torch.nn.Module],
        "k": [Interval(Integral, 1, None, closed="left")],
        "target_tpr": [Interval(Real, 0, 1, closed="right")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "n_threads": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"}), None],
        "verbose": ["verbose"],
    }

    def __init__(self, model, k=10, *, target_tpr=0.95, batch_size=128, device="auto", n_threads="auto", verbose=0):
        self.model = model
        self.k = k
        self.target_tpr = target_tpr
        self.batch_size = batch_size
        self.device = device
        self.n_threads = n_threads
        self.verbose = verbose

    @fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Store the training images' features and standardize both terms on them; set the threshold.

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader
        y : ignored

        Returns
        -------
        self : object
        """
        X, _ = validate_fit_images(self, X, self.batch_size)
        self.device_ = resolve_device(self.device)
        self.model_ = frozen_copy(self.model, self.device_)
        logits, features, self.classifier_ = self._outputs(X, classifier=None)
        n = features.shape[0]
        self.n_neighbors_ = _n_neighbors(self.k, n, "images")
        bank = F.normalize(features.float(), dim=1)
        self.bank_ = bank.numpy()
        # leave-one-out: a training image's nearest neighbour in the bank is itself
        k = self.n_neighbors_ + 1 if n > self.n_neighbors_ else self.n_neighbors_
        terms = [energy_knn_terms(z, f, bank, k) for z, f in _chunks(logits, features)]
        energy, knn = torch.cat([e for e, _ in terms]), torch.cat([d for _, d in terms])
        self.standardization_ = np.array([energy.mean(), _spread(energy), knn.mean(), _spread(knn)])
        self.offset_ = offset_for_tpr(standardized_sum(energy, knn, self.standardization_).numpy(), self.target_tpr)
        return self

    def _outputs(self, X, classifier):
        """Logits and penultimate features of ``X`` (float64, CPU), in order, and the classifier layer's name
        (found on the first batch when ``classifier`` is None)."""
        batches, total = image_batches(X, self.batch_size)
        logits, features = [], []
        with torch_threads(getattr(self, "n_threads", "auto")):
            for x, _ in tqdm(batches, total=total, desc="energy+knn", disable=self.verbose <= 0):
                x = to_model_input(x, self.device_, input_dtype(self.model_))
                z, f, classifier = classifier_outputs(self.model_, x, classifier)
                logits.append(z.double().cpu())
                features.append(f.double().cpu())
        if not logits:
            raise ValueError("Found no images: the data is empty.")
        return torch.cat(logits), torch.cat(features), classifier

    def score_samples(self, X):
        """Standardized energy plus standardized KNN score (higher = more in-distribution).

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader

        Returns
        -------
        scores : ndarray of shape (N,)
        """
        check_is_fitted(self)
        if not is_torch_data(X):
            X = validate_images(self, X, reset=False)
        logits, features, _ = self._outputs(X, self.classifier_)
        bank, standardization = torch.from_numpy(self.bank_), torch.from_numpy(self.standardization_)
        return torch.cat([energy_knn_score(z, f, bank, self.n_neighbors_, standardization)
                          for z, f in _chunks(logits, features)]).numpy()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.target_tags.required = False
        return tags


def _chunks(logits, features, size=1024):
    """``(logits, features)`` in chunks of ``size`` rows: each chunk is compared with the whole bank at once."""
    return zip(logits.split(size), features.split(size))


def _n_neighbors(k, n, samples):
    """``k``, or ``n - 1`` (at least 1) with a warning when ``n`` training ``samples`` are too few for it."""
    used = min(k, max(n - 1, 1))
    if used < k:
        warnings.warn(f"k={k} needs more than {n} training {samples}; k={used} is used.", EarlinWarning, stacklevel=3)
    return used


def _spread(values):
    """Standard deviation, or 1 where the values are all equal (a term that cannot rank adds a constant)."""
    std = float(values.std(correction=0))  # as StandardScaler: the population standard deviation
    return std if std > 0 else 1.0


class KNNDetector(ThresholdMixin, OutlierMixin, BaseEstimator):
    """Distance to the k-th nearest ID training sample, on (normalized) features.

    Parameters
    ----------
    k : int, default=50
        Which neighbour; capped at ``n_samples - 1`` (with a warning).
    normalize : bool, default=True
        L2-normalize features first (Sun et al. 2022).
    target_tpr : float, default=0.95

    Attributes
    ----------
    n_neighbors_ : int
        The ``k`` actually used.
    offset_ : float
        Threshold, set on leave-one-out scores of the training data (a
        training sample is not its own neighbour).
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from earlin_sklearn.baselines import KNNDetector
    >>> X = np.random.default_rng(0).normal(size=(200, 8))
    >>> knn = KNNDetector(k=10, normalize=False).fit(X)
    >>> knn.predict(X[:3] + 100).tolist()  # far from every ID sample: OOD
    [-1, -1, -1]
    """

    _parameter_constraints = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "normalize": ["boolean"],
        "target_tpr": [Interval(Real, 0, 1, closed="right")],
    }

    def __init__(self, k=50, normalize=True, target_tpr=0.95):
        self.k = k
        self.normalize = normalize
        self.target_tpr = target_tpr

    def _prepare(self, X):
        if self.normalize:
            return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X

    @fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Index the ID training features.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self : object
        """
        X = self._prepare(validate_data(self, X, reset=True, dtype=np.float64))
        n = X.shape[0]
        self.n_neighbors_ = k = _n_neighbors(self.k, n, "samples")
        self.index_ = NearestNeighbors(n_neighbors=k).fit(X)
        if n > k:  # leave-one-out: the nearest "neighbour" of a training sample is itself
            train = -self.index_.kneighbors(X, n_neighbors=k + 1)[0][:, -1]
        else:
            train = -self.index_.kneighbors(X)[0][:, -1]
        self.offset_ = offset_for_tpr(train, self.target_tpr)
        return self

    def score_samples(self, X):
        """Minus the distance to the k-th nearest training sample (higher = more ID).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        X = self._prepare(validate_data(self, X, reset=False, dtype=np.float64))
        return -self.index_.kneighbors(X)[0][:, -1]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        return tags
