"""Saving fitted estimators in a format whose loading cannot run code: JSON plus safetensors.

``joblib``/``pickle`` files run code when loaded; they are for files you made.
:func:`save_detector` writes a directory instead:

- ``estimator.json``: the estimator's structure, parameters and fitted
  scalars, with the sha256 of the tensor file and of the backbone's weights;
- ``tensors.safetensors``: every fitted array, and (by default) the backbone's
  weights. safetensors (the Hugging Face format) stores raw tensors and a
  JSON header, nothing executable, and is read without unpickling.

:func:`load_detector` rebuilds only classes on an allow-list (this package's
estimators, ``Pipeline``, ``PowerTransformer``, ``StandardScaler``). The user
passes the backbone architecture; the stored weights are loaded into it with
``strict=True`` and their hash checked, or, with ``include_weights=False``,
the weights the user's backbone already has must hash to the stored value.
"""

import hashlib
import hmac
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import PowerTransformer, StandardScaler

from ._export import check_seal, seal
from ._torch import available_device, frozen_copy

FORMAT = "earlin-estimator/1"
JSON_FILE = "estimator.json"
TENSOR_FILE = "tensors.safetensors"
_WEIGHTS = "backbone."


def _allowed():
    from ._detector import ShallowFeatureOODDetector
    from ._distance import DistanceDetector
    from ._features import BackboneFeatures
    from ._moments import FeatureMoments
    from ._selection import ChannelSelector
    from .baselines import KNNDetector, LogitDetector

    classes = (ShallowFeatureOODDetector, BackboneFeatures, ChannelSelector, DistanceDetector, LogitDetector,
               KNNDetector, FeatureMoments, Pipeline, PowerTransformer, StandardScaler)
    return {f"{c.__module__}.{c.__qualname__}": c for c in classes}


def weights_digest(module):
    """sha256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Encoder:
    def __init__(self, backbone_holders):
        self.arrays = {}
        self.modules = {}  # id -> "param" | "fitted"
        self.holders = backbone_holders

    def encode(self, value, path):
        if isinstance(value, torch.nn.Module):
            kind = self.holders.get(id(value))
            if kind is None:
                raise TypeError(f"{path} holds a torch module that is not the detector's backbone; it cannot be saved.")
            return {"__module__": kind}
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "biuf":
                self.arrays[path] = value
                return {"__array__": path}
            if value.dtype.kind in "UO" and all(isinstance(v, str) for v in value.ravel()):
                return {"__strings__": value.tolist(), "shape": list(value.shape)}
            raise TypeError(f"{path} is an array of {value.dtype}, which cannot be saved without pickling.")
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.device):
            return {"__device__": str(value)}
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {"__dict__": {k: self.encode(v, f"{path}.{k}") for k, v in value.items()}}
        name = f"{type(value).__module__}.{type(value).__qualname__}"
        if name in _allowed():
            return {"__estimator__": name,
                    "state": {k: self.encode(v, f"{path}.{k}") for k, v in vars(value).items()}}
        raise TypeError(f"{path} is a {type(value).__name__}, which cannot be saved without pickling.")


def _backbone_holders(estimator):
    """``({id(module): "param" | "fitted"}, a fitted module)`` for the user's module parameter and the frozen copies."""
    holders, fitted = {}, None

    def visit(est):
        nonlocal fitted
        for key, value in vars(est).items():
            if isinstance(value, torch.nn.Module):
                if key.endswith("_") or holders.get(id(value)) == "fitted":
                    holders[id(value)] = "fitted"  # a loaded pickle's parameter is its fitted copy
                    fitted = value
                else:
                    holders[id(value)] = "param"
            elif isinstance(value, Pipeline):
                for _, step in value.steps:
                    if not isinstance(step, str):
                        visit(step)

    visit(estimator)
    return holders, fitted


def save_detector(estimator, directory, *, include_weights=True, key=None):
    """Save a fitted estimator so that loading it cannot run code.

    Parameters
    ----------
    estimator : ShallowFeatureOODDetector, BackboneFeatures, LogitDetector, ...
        A fitted estimator of this package.
    directory : str or Path
        Created if missing; receives ``estimator.json`` and ``tensors.safetensors``.
    include_weights : bool, default=True
        Store the backbone's weights too. Without them, :func:`load_detector`
        needs a backbone that already holds exactly the fitted weights.
    key : bytes or str, default=None
        Sign ``estimator.json`` (HMAC-SHA256, as :func:`save_split` does);
        ``load_detector(..., key=key)`` then refuses files not signed with it.

    Returns
    -------
    directory : Path

    Examples
    --------
    >>> import tempfile, numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector, load_detector, save_detector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32).numpy()
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> folder = save_detector(det, tempfile.mkdtemp())
    >>> loaded = load_detector(folder, backbone=cifar_resnet(20))  # the architecture; weights come from the file
    >>> bool(np.array_equal(loaded.score_samples(X), det.score_samples(X)))
    True
    """
    from safetensors.torch import save as save_tensors
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(estimator)
    holders, fitted = _backbone_holders(estimator)
    if fitted is None:
        raise TypeError(f"{type(estimator).__name__} holds no fitted backbone; save it with joblib.")
    encoder = _Encoder(holders)
    tree = encoder.encode(estimator, "estimator")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in encoder.arrays.items()}
    if include_weights:  # torch tensors (bfloat16 included), copied so that tied weights are stored apart
        for name, t in fitted.state_dict().items():
            tensors[_WEIGHTS + name] = t.detach().cpu().contiguous().clone()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = save_tensors(tensors)
    (directory / TENSOR_FILE).write_bytes(blob)
    document = {
        "format": FORMAT,
        "torch_version": torch.__version__,
        "backbone_class": f"{type(fitted).__module__}.{type(fitted).__qualname__}",
        "backbone_sha256": weights_digest(fitted),
        "includes_weights": bool(include_weights),
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "estimator": tree,
    }
    (directory / JSON_FILE).write_text(json.dumps(seal(document, key), indent=1, allow_nan=True))
    return directory


def load_detector(directory, backbone, key=None):

    """Load an estimator written by :func:`save_detector`; nothing in the files is executed.

    Parameters
    ----------
    directory : str or Path
    backbone : torch.nn.Module
        The backbone's architecture (e.g. ``cifar_resnet(20)``). When the
        weights were saved they are loaded into it (``strict=True``); either
        way the weights must hash to the saved value.
    key : bytes or str, default=None
        Require a signature made with this key (see :func:`save_detector`).

    Returns
    -------
    estimator : the saved estimator, fitted

    Raises
    ------
    ValueError
        If a file was modified, the backbone does not match, or the files
        name a class that is not on the allow-list.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32).numpy()
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> import tempfile
    >>> from earlin_sklearn import load_detector, save_detector
    >>> folder = save_detector(det, tempfile.mkdtemp(), include_weights=False)  # the device has the weights
    >>> same = load_detector(folder, backbone=det.backbone)  # checked against the weights' sha256
    >>> bool(np.array_equal(same.predict(X), det.predict(X)))
    True
    """
    from safetensors.torch import load as load_tensors

    directory = Path(directory)
    document = json.loads((directory / JSON_FILE).read_text())
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{directory / JSON_FILE} is not an {FORMAT!r} file.")
    check_seal(document, key, directory / JSON_FILE, "save_detector")  # the JSON too, not only the tensors
    blob = (directory / TENSOR_FILE).read_bytes()
    if not hmac.compare_digest(hashlib.sha256(blob).hexdigest(), str(document.get("tensors_sha256"))):
        raise ValueError(f"{directory / TENSOR_FILE} does not match its sha256 in {JSON_FILE}; refusing it.")
    tensors = load_tensors(blob)
    if not isinstance(backbone, torch.nn.Module):
        raise TypeError(f"backbone must be a torch.nn.Module (the architecture); got {type(backbone).__name__}.")
    if document["includes_weights"]:
        state = {k[len(_WEIGHTS):]: v for k, v in tensors.items() if k.startswith(_WEIGHTS)}
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"The saved weights do not fit this backbone ({type(backbone).__name__}; saved: "
                             f"{document['backbone_class']}): {str(exc).splitlines()[0]}") from None
    digest = weights_digest(backbone)
    if not hmac.compare_digest(digest, document["backbone_sha256"]):
        raise ValueError("This backbone's weights are not the ones the detector was fitted with "
                         f"(sha256 {digest[:12]}..., saved {document['backbone_sha256'][:12]}...).")
    decoder = _Decoder({k: v.numpy() for k, v in tensors.items() if not k.startswith(_WEIGHTS)}, backbone)
    return decoder.decode(document["estimator"])


class _Decoder:
    def __init__(self, arrays, backbone):
        self.arrays = arrays
        self.backbone = backbone
        self.frozen = {}
        self.allowed = _allowed()

    def decode(self, value):
        if isinstance(value, list):
            return [self.decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "__array__" in value:
            return self.arrays[value["__array__"]].copy()
        if "__strings__" in value:
            return np.array(value["__strings__"], dtype=object).reshape(value["shape"])
        if "__device__" in value:
            return torch.device(value["__device__"])
        if "__tuple__" in value:
            return tuple(self.decode(v) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: self.decode(v) for k, v in value["__dict__"].items()}
        if "__module__" in value:
            return self.backbone if value["__module__"] == "param" else None  # fitted copies: set below
        if "__estimator__" in value:
            cls = self.allowed.get(value["__estimator__"])
            if cls is None:
                raise ValueError(f"The file names {value['__estimator__']!r}, which is not an estimator this "
                                 "loader rebuilds; refusing it.")
            est = cls.__new__(cls)
            state = {k: self.decode(v) for k, v in value["state"].items()}
            fitted = [k for k, v in value["state"].items() if isinstance(v, dict) and v.get("__module__") == "fitted"]
            if fitted:
                device = available_device(state.get("device_", torch.device("cpu")), cls.__name__)
                if "device_" in state:
                    state["device_"] = device
                if str(device) not in self.frozen:  # one frozen copy per device, shared by every fitted holder
                    self.frozen[str(device)] = frozen_copy(self.backbone, device)
                for k in fitted:
                    state[k] = self.frozen[str(device)]
            est.__dict__.update(state)
            return est
        raise ValueError(f"Unexpected entry in the estimator file: {sorted(value)[:3]}.")
