"""The feature tap: pooled per-channel activations of one layer of a frozen backbone."""

import copy
import difflib
import logging
import warnings
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ._inputs import image_batches, is_torch_data, labels_to_numpy, to_model_input, validate_fit_images, validate_images

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "max", "meanstd")


def pool_activation(activation, pooling):
    """Reduce each channel of an activation ``(N, C, *spatial)`` to numbers.

    Parameters
    ----------
    activation : torch.Tensor of shape (N, C, ...)
        Layer output. A 2-D activation ``(N, C)`` has no spatial extent: every
        pooling returns it unchanged (and a zero standard deviation for ``"meanstd"``).
    pooling : {"mean", "max", "meanstd"}
        ``"mean"``: channel average (the EARLIN reduction); ``"max"``: channel
        maximum; ``"meanstd"``: the C channel means followed by the C channel
        standard deviations.

    Returns
    -------
    pooled : torch.Tensor of shape (N, C) or (N, 2 * C)
    """
    flat = activation.flatten(2) if activation.dim() > 2 else activation.unsqueeze(2)
    if pooling == "mean":
        return flat.mean(dim=2)
    if pooling == "max":
        return flat.amax(dim=2)
    if pooling == "meanstd":
        # two passes by hand: as exact as torch.std here and several times faster on the CPU
        mean = flat.mean(dim=2, keepdim=True)
        std = (flat - mean).square().mean(dim=2).sqrt()
        return torch.cat([mean.squeeze(2), std], dim=1)
    raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}.")


def resolve_device(device):
    """``"auto"`` -> CUDA when available, else CPU; anything else -> ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def get_layer(module, layer):
    """The submodule called ``layer`` (dotted name as in ``named_modules()``).

    Raises
    ------
    ValueError
        If no such submodule exists; the message lists the closest valid names.
    """
    names = [name for name, _ in module.named_modules() if name]
    if layer in names:
        return module.get_submodule(layer)
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.4)
    hint = f" Closest valid names: {close}." if close else ""
    raise ValueError(
        f"Layer {layer!r} is not a submodule of the backbone.{hint} "
        f"Valid names are those of `backbone.named_modules()` ({len(names)} in all, "
        f"e.g. {names[:6]})."
    )


class _LayerReached(Exception):
    """Raised by the tap to stop the forward pass right after the tapped layer."""


class _LayerTap:
    """Forward hook that stores the layer's output and stops the forward pass.

    A module-level class (not a closure) so that nothing unpicklable is ever
    attached to the model; it is registered for one call and removed after it.
    """

    def __init__(self):
        self.output = None

    def __call__(self, module, args, output):
        self.output = output
        raise _LayerReached


def run_to_layer(module, layer_module, x):
    """Forward ``x`` through ``module`` and return ``layer_module``'s output.

    The forward pass stops right after the layer (its first call), so tapping an
    early layer costs only the network's prefix.
    """
    tap = _LayerTap()
    handle = layer_module.register_forward_hook(tap)
    try:
        module(x)
    except _LayerReached:
        pass
    finally:
        handle.remove()
    out = tap.output
    if out is None:
        raise RuntimeError(
            "The tapped layer was never called during the forward pass; choose a "
            "layer that the backbone's forward() uses."
        )
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"The tapped layer returned {type(out).__name__}, not a tensor.")
    return out


def input_dtype(module):
    """The floating dtype that ``module`` computes in (of its first parameter; float32 by default)."""
    dtype = next(module.parameters(), torch.empty(0)).dtype
    return dtype if dtype.is_floating_point else torch.float32


def _first_in_channels(module):
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return sub.in_channels
    return None


class BackboneFeatures(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Pooled per-channel activations of one layer of a frozen PyTorch backbone.

    A transformer from images ``(N, C, H, W)`` to features ``(N, n_features)``.
    ``fit`` deep-copies the backbone into ``module_`` (evaluation mode, gradients
    off), so the user's model is never modified. ``transform`` runs each batch
    through the copy with a forward hook on ``layer`` that stops the forward pass
    right after it: an early layer costs only the network's prefix.

    Parameters
    ----------
    backbone : torch.nn.Module
        The pretrained model. Not modified.
    layer : str
        Dotted name of the layer to tap, as in ``backbone.named_modules()``
        (e.g. ``"layer1"`` or ``"features.3"``). If the layer is called several
        times in a forward pass, its first call is tapped.
    pooling : {"mean", "max", "meanstd"}, default="meanstd"
        How each channel's feature map becomes numbers: mean (the EARLIN
        paper's reduction), max, or mean and standard deviation (two features
        per channel; the default, which detected OOD inputs best in
        docs/benchmarks.rst).
    batch_size : int, default=128
        Images per forward pass.
    device : str or torch.device, default="auto"
        Where the backbone runs; ``"auto"`` picks CUDA when available.
    verbose : int, default=0
        ``verbose > 0`` shows a progress bar over batches.

    Attributes
    ----------
    module_ : torch.nn.Module
        Frozen copy of the backbone, on ``device_``.
    device_ : torch.device
        Resolved device.
    n_features_in_ : int
        Number of input channels (``X.shape[1]``).
    input_shape_ : tuple of int
        Shape of one input, ``X.shape[1:]``, seen in ``fit``.
    n_channels_ : int
        Number of channels of the tapped activation.
    activation_shape_ : tuple of int
        Shape of the tapped activation for one input.

    Examples
    --------
    >>> import torch
    >>> from earlin_sklearn import BackboneFeatures
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
    ...                           torch.nn.Conv2d(8, 4, 3))
    >>> X = torch.rand(10, 3, 16, 16).numpy()
    >>> BackboneFeatures(net, layer="1").fit_transform(X).shape  # 8 channel means, 8 stds
    (10, 16)
    """

    _parameter_constraints = {
        "backbone": [torch.nn.Module],
        "layer": [str],
        "pooling": [StrOptions(set(POOLINGS))],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "verbose": ["verbose"],
    }

    def __init__(self, backbone, layer, *, pooling="meanstd", batch_size=128, device="auto", verbose=0):
        self.backbone = backbone
        self.layer = layer
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Freeze a copy of the backbone and check the layer on one input.

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader
            Images. Only the first one is run (to learn the activation's shape).
        y : ignored

        Returns
        -------
        self : object
        """
        get_layer(self.backbone, self.layer)
        X, sample = validate_fit_images(self, X, self.batch_size)
        self.input_shape_ = tuple(int(s) for s in sample.shape[1:])
        self.device_ = resolve_device(self.device)
        self.module_ = copy.deepcopy(self.backbone).eval().requires_grad_(False).to(self.device_)
        self._check_channel_layout(sample)
        activation = self._activation(sample)
        self.activation_shape_ = tuple(int(s) for s in activation.shape[1:])
        self.n_channels_ = self.activation_shape_[0]
        self._n_features_out = self.n_channels_ * (2 if self.pooling == "meanstd" else 1)
        logger.debug("Tapped %r: activation shape %s", self.layer, self.activation_shape_)
        return self

    def transform(self, X):
        """Pooled features of the tapped layer.

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader

        Returns
        -------
        features : ndarray of shape (N, n_features), float64
        """
        return self.features_and_labels(X)[0]

    def features_and_labels(self, X):
        """Pooled features, plus the labels that a Dataset or DataLoader yields.

        Parameters
        ----------
        X : array-like or tensor of shape (N, C, H, W), torch Dataset or DataLoader

        Returns
        -------
        features : ndarray of shape (N, n_features), float64
        y : ndarray of shape (N,) or None
            Labels from ``(x, y)`` batches; None for arrays and unlabelled batches.
        """
        check_is_fitted(self)
        if not is_torch_data(X):
            X = validate_images(self, X, reset=False)
        batches, total = image_batches(X, self.batch_size)
        feats, labels = [], []
        bar = tqdm(batches, total=total, desc=f"features@{self.layer}", disable=self.verbose <= 0)
        for x, y in bar:
            feats.append(self._pooled(x))
            labels.append(y)
        if not feats:
            raise ValueError("Found no images: the data is empty.")
        return np.concatenate(feats).astype(np.float64, copy=False), labels_to_numpy(labels)

    def _pooled(self, x):
        return pool_activation(self._activation(x), self.pooling).float().cpu().numpy()

    def _activation(self, x):
        dtype = input_dtype(self.module_)
        with torch.inference_mode():
            x = to_model_input(x, self.device_, dtype)
            return run_to_layer(self.module_, self.module_.get_submodule(self.layer), x)

    def _check_channel_layout(self, sample):
        expected = _first_in_channels(self.module_)
        if expected is None or sample.ndim != 4 or sample.shape[1] == expected:
            return
        hint = ""
        if sample.shape[-1] == expected:
            hint = " It looks channels-last (N, H, W, C): use X.transpose(0, 3, 1, 2)."
        raise ValueError(
            f"The backbone's first convolution expects {expected} input channels, but the "
            f"images have shape (N, {', '.join(map(str, sample.shape[1:]))}); images must "
            f"be (N, C, H, W).{hint}"
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        return tags

    def __getstate__(self):
        state = dict(super().__getstate__())  # object.__getstate__ returns __dict__ itself
        if "module_" in state and self.device_.type != "cpu":
            state["module_"] = copy.deepcopy(self.module_).cpu()
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "module_" in state:
            device = self.device_
            if device.type == "cuda" and not torch.cuda.is_available():
                warnings.warn(
                    f"This model was fitted on {device}, which this machine lacks; "
                    "it runs on the CPU instead.",
                    UserWarning,
                    stacklevel=2,
                )
                device = torch.device("cpu")
            self.device_ = device
            self.module_ = self.module_.to(device)
