"""The feature tap: pooled per-channel activations of one layer of a frozen backbone."""

import logging
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ._torch import (PRECISIONS, TorchStateMixin, first_in_channels, frozen_copy, get_layer, input_dtype,
                     precision_context, resolve_device, torch_threads)
from ._inputs import (check_batch, check_image_shape, image_batches, is_torch_data, labels_to_numpy, to_model_input, validate_fit_images,
                      validate_images)
from ._typing import fit_context

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "max", "meanstd")
LAYOUTS = ("auto", "channels", "tokens", "tokens+cls")


def resolve_layout(layout, activation):
    """``"auto"`` -> ``"tokens"`` for a 3-D activation ``(N, tokens, dim)``, else ``"channels"``."""
    if layout == "auto":
        return "tokens" if activation.dim() == 3 else "channels"
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}.")
    if layout != "channels" and activation.dim() != 3:
        raise ValueError(f"layout={layout!r} needs a token sequence (N, tokens, dim); the tapped activation "
                         f"has shape {tuple(activation.shape)}. Use layout='channels'.")
    return layout


def pooled_parts(activation, pooling, layout="channels"):
    """The pooled features of one activation, as the list of ``(N, C)`` blocks that :func:`pool_activation` joins.

    ``[means]``, ``[maxima]`` or ``[means, standard deviations]`` (with
    ``layout="tokens+cls"``, the class token's values first). The reductions
    run over the spatial axes of the map as it is, with ``keepdim``, the
    form that XNNPACK (ExecuTorch) and ONNX Runtime turn into their global
    pooling kernels; the edge module pools with this same function.
    """
    layout = resolve_layout(layout, activation)
    if layout == "tokens":
        return pooled_parts(activation.transpose(1, 2), pooling)
    if layout == "tokens+cls":
        return [activation[:, 0, :], *pooled_parts(activation[:, 1:, :].transpose(1, 2), pooling)]
    a = activation if activation.dim() > 2 else activation.unsqueeze(2)
    dims = tuple(range(2, a.dim()))
    if pooling == "mean":
        return [a.mean(dim=dims, keepdim=True).flatten(1)]
    if pooling == "max":
        return [a.amax(dim=dims, keepdim=True).flatten(1)]
    if pooling == "meanstd":
        # two passes by hand: as exact as torch.std and many times faster on the CPU (torch.std_mean takes
        # ~0.2 ms on one 16x32x32 map, this ~15 us)
        mean = a.mean(dim=dims, keepdim=True)
        centered = a - mean
        std = (centered * centered).mean(dim=dims, keepdim=True).sqrt()
        return [mean.flatten(1), std.flatten(1)]
    raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}.")


def pool_activation(activation, pooling, layout="channels"):
    """Reduce each channel of an activation ``(N, C, *spatial)`` to numbers.

    Parameters
    ----------
    activation : torch.Tensor of shape (N, C, ...) or (N, tokens, dim)
        Layer output. A 2-D activation ``(N, C)`` has no spatial extent: every
        pooling returns it unchanged (and a zero standard deviation for ``"meanstd"``).
    pooling : {"mean", "max", "meanstd"}
        ``"mean"``: channel average (the EARLIN reduction); ``"max"``: channel
        maximum; ``"meanstd"``: the C channel means followed by the C channel
        standard deviations.
    layout : {"channels", "tokens", "tokens+cls", "auto"}, default="channels"
        ``"channels"``: axis 1 holds the channels (convolutional networks).
        ``"tokens"``: a token sequence ``(N, tokens, dim)`` as vision
        transformers make; each embedding dimension is pooled over the tokens.
        ``"tokens+cls"``: the same, with the first (class) token kept apart:
        its ``dim`` values come first, then the pooled other tokens.
        ``"auto"``: ``"tokens"`` for 3-D activations, else ``"channels"``.

    Returns
    -------
    pooled : torch.Tensor of shape (N, C) or (N, 2 * C)
        (``dim`` more columns with ``"tokens+cls"``.)
    """
    parts = pooled_parts(activation, pooling, layout)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


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


class _ExtraTap:
    """Forward hook that stores a layer's output (its first call) and lets the pass go on."""

    def __init__(self):
        self.output = None

    def __call__(self, module, args, output):
        if self.output is None:
            self.output = output


class _NotATensor(TypeError):
    """The tapped layer's output is not a tensor (a problem of the layer choice, not of the images)."""


def _tensor_output(out, name):
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise _NotATensor(f"The tapped layer {name!r} returned {type(out).__name__}, not a tensor.")
    return out


def _is_block(module):
    """A block holds layers; a single convolution, norm or activation does not."""
    return next(module.children(), None) is not None


def run_to_layer(module, layer_module, x, extra_modules=()):
    """Forward ``x`` through ``module`` and return ``layer_module``'s output.

    The forward pass stops right after the layer (its first call), so tapping an
    early layer costs only the network's prefix. With ``extra_modules`` (layers
    that run before it), returns the list ``[*extra outputs, layer output]``.
    """
    tap = _LayerTap()
    extras = [_ExtraTap() for _ in extra_modules]
    handles = [m.register_forward_hook(t) for m, t in zip(extra_modules, extras)]
    handles.append(layer_module.register_forward_hook(tap))
    try:
        module(x)
    except _LayerReached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if tap.output is None:
        raise ValueError(
            "The tapped layer was never called during the forward pass; choose a "
            "layer that the backbone's forward() uses."
        )
    out = _tensor_output(tap.output, "layer")
    if not extra_modules:
        return out
    missing = [i for i, t in enumerate(extras) if t.output is None]
    if missing:
        raise ValueError(
            "extra_layers must run before `layer` in the forward pass (they are taps inside the edge part); "
            f"extra layer number {missing[0]} was not called before it."
        )
    return [*(_tensor_output(t.output, "extra") for t in extras), out]


class _PoolingTap:
    """Forward hook that pools a module's output when it first returns (before any later in-place op can change
    it, as ``nn.ReLU(inplace=True)`` after a norm does) and records the order the taps ran in."""

    def __init__(self, log, name, pool):
        self.log, self.name, self.pool = log, name, pool

    def __call__(self, module, args, output):
        if all(name != self.name for name, _, _ in self.log):
            self.log.append((self.name, output, self.pool(_tensor_output(output, self.name))))


class _AllTapped(Exception):
    """Raised by the last tap to stop the forward pass."""


def run_taps(module, names, x, pool, stop=True):
    """Pool the outputs of the modules ``names`` in one forward pass of ``x``: ``[(name, output, pooled), ...]``.

    In the order the modules first ran; with ``stop``, the pass stops as soon as
    every one of them has run (the nested prefixes of several cut points cost
    one pass to the deepest). Modules that never ran are missing.
    """
    log = []
    names = list(dict.fromkeys(names))
    taps = [_PoolingTap(log, name, pool) for name in names]

    def last(module, args, output):
        if stop and len(log) == len(names):
            raise _AllTapped

    handles = []
    try:
        for name, tap in zip(names, taps):
            sub = module.get_submodule(name)
            handles.append(sub.register_forward_hook(tap))
            handles.append(sub.register_forward_hook(last))
        module(x)
    except _AllTapped:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return log


def distinct_taps(log):
    """``{name: first name}`` of a :func:`run_taps` log: taps that returned the very same tensor with the same
    pooled values (ResNet's ``"layer1"`` returns its last block's output; an ``nn.Identity``, its input) map to
    the first of them, so identical taps are computed once."""
    same, seen = {}, []
    for name, out, pooled in log:
        same[name] = next((other for other, o, p in seen if o is out and torch.equal(p, pooled)), name)
        seen.append((name, out, pooled))
    return same


def resolve_extra_layers(backbone, layer, extra_layers):
    """The extra taps of a detector at ``layer``: ``extra_layers`` itself, or the ``"auto"`` rule.

    ``"auto"``: the output of the block that runs just before the last block of
    ``layer``. For a container such as ResNet's ``layer1`` or ShuffleNet's
    ``stage2`` (an ``nn.Sequential`` of blocks, modules that hold layers),
    that is its second-to-last block; for a block inside an
    ``nn.Sequential``, its previous sibling block; otherwise (a single
    convolution, norm or activation, or no block before it) there is none.
    That block's output is computed on the edge anyway. One extra tap was
    selected over none or two by an ID-only criterion (docs/benchmarks.rst).
    """
    if not (isinstance(extra_layers, str) and extra_layers == "auto"):
        names = list(extra_layers or ())
        for name in names:
            get_layer(backbone, name)
        return names
    target = get_layer(backbone, layer)
    children = list(target.named_children())
    if isinstance(target, torch.nn.Sequential) and len(children) >= 2 and all(_is_block(m) for _, m in children):
        return [f"{layer}.{children[-2][0]}"]
    parent_name, own = layer.rsplit(".", 1) if "." in layer else ("", layer)
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    names = [n for n, _ in parent.named_children()]
    at = names.index(own)
    if isinstance(parent, torch.nn.Sequential) and at > 0 and _is_block(target) \
            and _is_block(parent.get_submodule(names[at - 1])):
        return [f"{parent_name}.{names[at - 1]}" if parent_name else names[at - 1]]
    return []


class BackboneFeatures(TorchStateMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
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
        per channel; the default, see docs/benchmarks.rst).
    layout : {"auto", "channels", "tokens", "tokens+cls"}, default="auto"
        What the axes of the tapped activations are. ``"channels"``:
        ``(N, C, *spatial)``, as convolutional networks make. ``"tokens"``:
        ``(N, tokens, dim)``, as vision transformers make; each embedding
        dimension is pooled over the tokens. ``"tokens+cls"``: the same with
        the class token (the first) kept apart, its values used as they are.
        ``"auto"`` reads 3-D activations as tokens and the others as
        channels; pass ``"channels"`` for a ``Conv1d`` output ``(N, C, L)``.
    extra_layers : sequence of str, default=()
        Further layers that run before ``layer`` (taps inside the edge part,
        e.g. ``["layer1.1"]``); their pooled features come first, in the
        given order, then ``layer``'s. They cost nothing extra on the edge:
        the prefix computes them anyway.
    batch_size : int, default=128
        Images per forward pass.
    device : str or torch.device, default="auto"
        Where the backbone runs; ``"auto"`` picks CUDA when available.
    n_threads : int, "auto" or None, default="auto"
        torch intra-op threads while this estimator runs the backbone
        (restored afterwards). ``"auto"``: half the cores, at least 1, which
        does not collapse when another process holds a core; None: torch's
        current setting.
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        ``"bfloat16"`` and ``"float16"`` run the backbone under
        ``torch.autocast`` (mixed precision: faster on GPUs with tensor
        cores); pooling stays in float32. The exported edge module runs in
        the backbone's own dtype, so its scores then differ from the
        estimator's by the rounding measured in the user guide.
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
        Number of channels of the tapped activation (the embedding dimension
        of a token sequence).
    layout_ : str
        The resolved layout of the tapped activation.
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

    _torch_modules = ("module_",)
    _torch_param = ("backbone", "module_")

    _parameter_constraints = {
        "backbone": [torch.nn.Module],
        "layer": [str],
        "pooling": [StrOptions(set(POOLINGS))],
        "layout": [StrOptions(set(LAYOUTS))],
        "extra_layers": ["array-like", tuple, list],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "n_threads": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"}), None],
        "precision": [StrOptions(set(PRECISIONS))],
        "verbose": ["verbose"],
    }

    def __init__(self, backbone, layer, *, pooling="meanstd", layout="auto", extra_layers=(), batch_size=128,
                 device="auto", n_threads="auto", precision="float32", verbose=0):
        self.backbone = backbone
        self.layer = layer
        self.pooling = pooling
        self.layout = layout
        self.extra_layers = extra_layers
        self.batch_size = batch_size
        self.device = device
        self.n_threads = n_threads
        self.precision = precision
        self.verbose = verbose

    @fit_context(prefer_skip_nested_validation=True)
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
        X, sample = validate_fit_images(self, X, self.batch_size)
        return self._fit(sample, type(self).__name__)

    def _fit(self, sample, owner):
        """Fit from the first (validated) input; ``owner`` names the estimator the user called in errors."""
        get_layer(self.backbone, self.layer)
        self.extra_layers_ = resolve_extra_layers(self.backbone, self.layer, list(self.extra_layers))
        if self.layer in self.extra_layers_:
            raise ValueError(f"extra_layers must not contain `layer` ({self.layer!r}) itself.")
        self.n_features_in_ = int(sample.shape[1]) if sample.ndim > 1 else 1
        self.input_shape_ = tuple(int(s) for s in sample.shape[1:])
        self.device_ = resolve_device(self.device)
        self.module_ = frozen_copy(self.backbone, self.device_)
        try:
            with torch_threads(self.n_threads):
                *extra, activation = self._activations(sample)
        except _NotATensor:
            raise
        except (RuntimeError, TypeError, IndexError) as exc:  # the backbone refused the input
            raise ValueError(self._input_error(sample, exc, owner)) from exc
        self.activation_shape_ = tuple(int(s) for s in activation.shape[1:])
        self.layout_ = resolve_layout(self.layout, activation)
        self.n_channels_ = self.activation_shape_[-1 if self.layout_ != "channels" else 0]
        self._n_features_out = sum(int(pool_activation(a, self.pooling, self.layout).shape[1]) for a in (*extra, activation))
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
            X = validate_images(self, X, reset=False, input_shape=self.input_shape_)
        return self._features_and_labels(X, type(self).__name__)

    def _features_and_labels(self, X, owner):
        """:meth:`features_and_labels` of a validated array or of a Dataset/DataLoader (checked per batch)."""
        feats, labels = [], []
        for F, y in self._pooled_batches(X, owner):
            feats.append(F)
            labels.append(y)
        if not feats:
            raise ValueError(f"{owner} found no images: the data is empty.")
        return np.concatenate(feats), labels_to_numpy(labels)

    def _pooled_batches(self, X, owner, taps=None):
        """``(features, labels)`` batch by batch (float64 features; labels as an array, or None).

        Only one batch of images and of features is held at a time: fits
        stream through this. With ``taps`` (module names, in the order they
        run), the features are those of every tap, pooled as each returns,
        side by side, from one pass (:func:`run_taps`) instead of ``layer``'s.
        """
        torch_data = is_torch_data(X)
        if not torch_data:
            check_image_shape(X.shape[1:], owner, 0, self.input_shape_)
        batches, total = image_batches(X, self.batch_size)
        bar = tqdm(batches, total=total, desc=f"features@{self.layer}", disable=self.verbose <= 0)
        with torch_threads(getattr(self, "n_threads", "auto")):  # one setting for the whole pass
            for i, (x, y) in enumerate(bar):
                if torch_data:
                    check_batch(x, owner, i, self.input_shape_)
                F = self._pooled(x) if taps is None else self._pooled_taps(x, taps)
                yield F.astype(np.float64, copy=False), labels_to_numpy([y])

    def _pooled(self, x):
        return torch.cat(self._pooled_blocks(x), dim=1).double().cpu().numpy()  # float64 backbones keep theirs

    def _pooled_blocks(self, x):
        """The pooled features of each tap (``[*extra taps, layer]``), one ``(N, n_i)`` tensor each."""
        return [self._pool(a) for a in self._activations(x)]

    def _pool(self, activation):
        a = activation.float() if activation.dtype in (torch.bfloat16, torch.float16) else activation
        return pool_activation(a, self.pooling, self.layout)

    def _tap_log(self, x, taps):
        """:func:`run_taps` of a batch through ``module_`` (as :meth:`_activations` runs it)."""
        with torch.inference_mode(), precision_context(self.device_, getattr(self, "precision", "float32")):
            return run_taps(self.module_, taps, to_model_input(x, self.device_, input_dtype(self.module_)), self._pool)

    def _pooled_taps(self, x, taps):
        log = self._tap_log(x, taps)
        if len(log) != len(taps):
            ran = {name for name, _, _ in log}
            raise ValueError(f"The tapped layer {next(t for t in taps if t not in ran)!r} was never called during "
                             "the forward pass.")
        order = {name: i for i, (name, _, _) in enumerate(log)}
        return torch.cat([log[order[t]][2] for t in taps], dim=1).double().cpu().numpy()

    def _activations(self, x):
        """``[*extra taps, layer]`` activations of a batch."""
        dtype = input_dtype(self.module_)
        extra = [self.module_.get_submodule(name) for name in getattr(self, "extra_layers_", [])]
        with torch.inference_mode(), precision_context(self.device_, getattr(self, "precision", "float32")):
            x = to_model_input(x, self.device_, dtype)
            out = run_to_layer(self.module_, self.module_.get_submodule(self.layer), x, extra)
        return out if extra else [out]

    def _input_error(self, sample, exc, owner):
        """What to tell a user whose images the backbone could not run on."""
        expected = first_in_channels(self.module_)
        hint = ""
        if sample.ndim != 4:
            hint = f" Images must be (N, C, H, W); got {sample.ndim}-D data."
        elif expected is not None and sample.shape[1] != expected and sample.shape[-1] == expected:
            hint = " It looks channels-last (N, H, W, C): use X.transpose(0, 3, 1, 2)."
        return (
            f"{owner}: the backbone could not run on images of shape "
            f"(N, {', '.join(map(str, sample.shape[1:]))}).{hint} The backbone said: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        return tags
