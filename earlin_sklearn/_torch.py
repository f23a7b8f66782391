"""The one home for torch state: devices, dtypes, layer names, and how estimators holding modules pickle.

Every estimator that holds a torch module (:class:`BackboneFeatures`,
:class:`ShallowFeatureOODDetector`, :class:`~earlin_sklearn.baselines.LogitDetector`)
inherits :class:`TorchStateMixin`, in the spirit of skorch's
``cuda_dependent_attributes_``:

- fitted modules are stored as ``torch.save`` bytes (tensors on the CPU), so a
  detector fitted on a GPU loads on a CPU-only machine;
- on loading they go back to the fitted device, or to the CPU with a warning
  when that device is missing;
- the unfitted module parameter (``backbone``, ``model``) is not stored a
  second time: after loading it is the fitted frozen copy (same weights);
- the torch version is recorded; a pickle from another torch version that
  cannot be read fails with a message that says so, not a deep traceback.
"""

import contextlib
import copy
import difflib
import io
import os
import warnings

import torch

from .exceptions import EarlinWarning

_STATE_KEY = "_earlin_torch_state"


def default_threads():
    """Half the machine's cores, at least 1: the intra-op thread count used when ``n_threads="auto"``.

    torch's own default (every core) collapses when another process holds a
    core: its threads wait for each other at every barrier (see
    docs/user_guide.rst, "Threads", for the measurement).
    """
    return max(1, (os.cpu_count() or 1) // 2)


def resolve_threads(n_threads):
    """``"auto"`` -> :func:`default_threads`; None -> torch's current setting; an int as is."""
    if n_threads is None:
        return torch.get_num_threads()
    if isinstance(n_threads, str) and n_threads == "auto":
        return default_threads()
    return int(n_threads)


@contextlib.contextmanager
def torch_threads(n_threads):
    """Run the block with ``n_threads`` intra-op threads (see :func:`resolve_threads`), then restore torch's."""
    before = torch.get_num_threads()
    wanted = resolve_threads(n_threads)
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def resolve_device(device):
    """``"auto"`` -> CUDA when available, else CPU; anything else -> ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device: use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for a GPU, but torch finds no CUDA device on this machine "
                         "(torch.cuda.is_available() is False); use device='auto', which falls back to the CPU.")
    return resolved


def input_dtype(module):
    """The floating dtype that ``module`` computes in (of its first parameter; float32 by default)."""
    dtype = next(module.parameters(), torch.empty(0)).dtype
    return dtype if dtype.is_floating_point else torch.float32


def first_in_channels(module):
    """``in_channels`` of the first convolution registered in ``module`` (None without one)."""
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return sub.in_channels
    return None


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


def available_device(device, owner):
    """``device``, or the CPU with a warning when it is a GPU this machine lacks (loading a fitted estimator)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"This {owner} was fitted on {device}, which this machine lacks; it runs on the CPU instead.",
                      EarlinWarning, stacklevel=4)
        return torch.device("cpu")
    return device


PRECISIONS = ("float32", "bfloat16", "float16")


def precision_context(device, precision):
    """``torch.autocast`` to ``precision`` on ``device`` (mixed precision), or nothing for ``"float32"``."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, precision))


def to_device(x, device, dtype):
    """A batch on ``device`` in ``dtype``. To a GPU it crosses in its own dtype (uint8 camera pixels are a
    quarter of float32's bytes) from pinned memory without blocking the host, and is cast there."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory().to(device, non_blocking=True)
    return x.to(device=device, dtype=dtype)


def frozen_copy(module, device):
    """A deep copy of ``module`` in evaluation mode, gradients off, on ``device``; ``module`` is untouched."""
    return copy.deepcopy(module).eval().requires_grad_(False).to(device)


def _to_bytes(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


class _ClassName:
    """Stands for a module in a repr: ``ResNet(...)``."""

    def __init__(self, module):
        self.text = f"{type(module).__name__}(...)"

    def __repr__(self):
        return self.text


class TorchStateMixin:
    """Pickling for estimators that hold torch modules (see the module docstring).

    Subclasses set ``_torch_modules``: the fitted attributes that hold modules
    (e.g. ``("module_",)``), and ``_torch_param``: ``(parameter name, fitted
    attribute)`` for the user's module that the fitted copy replaces, or
    override :meth:`_fitted_copy_of_param`. The fitted device is read from
    ``device_``.
    """

    _torch_modules: tuple[str, ...] = ()
    _torch_param: tuple[str, str | None] | None = None

    def _fitted_copy_of_param(self):
        """The fitted module that stands for the unfitted module parameter (None when unfitted)."""
        if self._torch_param is None:
            return None
        return getattr(self, self._torch_param[1], None)

    def __getstate__(self):
        state = dict(super().__getstate__())
        fitted = {name: state.pop(name) for name in self._torch_modules if name in state}
        param = self._torch_param[0] if self._torch_param else None
        if param is not None and param in state and self._fitted_copy_of_param() is not None:
            state.pop(param)  # stored once: after loading it is the fitted copy
        else:
            param = None
        if fitted or param is not None:
            state[_STATE_KEY] = {
                "torch_version": torch.__version__,
                "modules": {name: _to_bytes(module) for name, module in fitted.items()},
                "param": param,
            }
        return state

    def __repr__(self, N_CHAR_MAX=700):
        """scikit-learn's repr, with each module parameter shown by its class name, not its every layer."""
        shown = object.__new__(type(self))  # a shallow stand-in: no copy of the modules (nor of their pickles)
        shown.__dict__.update(self.__dict__)
        for name, value in self.get_params(deep=False).items():
            if isinstance(value, torch.nn.Module):
                setattr(shown, name, _ClassName(value))
        return super(TorchStateMixin, shown).__repr__(N_CHAR_MAX)

    def __setstate__(self, state):
        torch_state = state.pop(_STATE_KEY, None)
        super().__setstate__(state)
        if torch_state is None:
            return
        saved_version = torch_state["torch_version"]
        if saved_version.split(".")[:2] != torch.__version__.split(".")[:2]:
            warnings.warn(
                f"This {type(self).__name__} was pickled with torch {saved_version}; this machine has torch "
                f"{torch.__version__}. Check its scores before deploying it, or refit.",
                EarlinWarning,
                stacklevel=2,
            )
        if torch_state["modules"]:
            device = available_device(getattr(self, "device_", torch.device("cpu")), type(self).__name__)
            if hasattr(self, "device_"):
                self.device_ = device
        for name, blob in torch_state["modules"].items():
            try:
                module = torch.load(io.BytesIO(blob), map_location=device, weights_only=False)
            except Exception as exc:
                raise RuntimeError(
                    f"Cannot load the torch module {name!r} of this {type(self).__name__}: it was saved with "
                    f"torch {saved_version} and this machine has torch {torch.__version__}. Load it with "
                    f"torch {saved_version}, or refit. (torch said: {type(exc).__name__}: {exc})"
                ) from exc
            setattr(self, name, module)
        if torch_state["param"] is not None:
            setattr(self, torch_state["param"], self._fitted_copy_of_param())
