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
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import PowerTransformer, StandardScaler

from ._export import check_seal, seal
from .edge._manifest import MAX_ARTIFACT_BYTES, read_regular_file
from .exceptions import DetectorFileError, SplitVerificationError
from ._torch import available_device, frozen_copy
from ._typing import Key
from ._typing import Path as PathType

FORMAT = "earlin-estimator/1"
JSON_FILE = "estimator.json"
TENSOR_FILE = "tensors.safetensors"
_WEIGHTS = "backbone."
MAX_JSON_BYTES = 256 << 20  # estimator.json holds scalars and structure; arrays are in the tensor file


def _allowed():
    from ._detector import ShallowFeatureOODDetector
    from ._distance import DistanceDetector
    from ._features import BackboneFeatures
    from ._moments import FeatureMoments
    from ._selection import ChannelSelector
    from .baselines import EnergyKNNDetector, KNNDetector, LogitDetector

    classes = (ShallowFeatureOODDetector, BackboneFeatures, ChannelSelector, DistanceDetector, LogitDetector,
               KNNDetector, EnergyKNNDetector, FeatureMoments, Pipeline, PowerTransformer, StandardScaler)
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


def save_detector(estimator: Any, directory: PathType, *, include_weights: bool = True, key: Key = None) -> Path:
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


def load_detector(directory: PathType, backbone: "torch.nn.Module | None", key: Key = None) -> Any:

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
    FileNotFoundError
        If the folder has no ``estimator.json``.
    DetectorFileError
        (a ValueError) If a file is malformed, modified, unsigned (with
        ``key``), a link or not a regular file, names a class that is not on
        the allow-list, holds a non-finite threshold or centroid, does not
        fit the backbone, or cannot score an input of its own fitted shape.

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
    directory = Path(directory)
    if not isinstance(backbone, torch.nn.Module):
        raise TypeError(f"backbone must be a torch.nn.Module (the architecture); got {type(backbone).__name__}.")
    try:
        estimator = _load(directory, backbone, key)
    except DetectorFileError:
        raise
    except SplitVerificationError as exc:  # the bounded reads' refusals (links, FIFOs, oversize files)
        raise DetectorFileError(str(exc)) from None
    except (KeyError, IndexError, TypeError, AttributeError, RecursionError, UnicodeDecodeError,
            json.JSONDecodeError) as exc:
        raise DetectorFileError(f"{directory} is not a detector folder save_detector wrote (malformed: "
                                f"{type(exc).__name__}: {exc}); refusing it.") from None
    _check_loaded(estimator, directory)
    return estimator


def _load(directory, backbone, key):
    from safetensors.torch import load as load_tensors

    path = directory / JSON_FILE
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} not found: pass a folder written by earlin_sklearn.save_detector.")
    document = json.loads(read_regular_file(path, MAX_JSON_BYTES).decode("utf-8"))
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise DetectorFileError(f"{path} is not an {FORMAT!r} file.")
    check_seal(document, key, path, "save_detector", error=DetectorFileError)  # the JSON too, not only the tensors
    blob = read_regular_file(directory / TENSOR_FILE, MAX_ARTIFACT_BYTES)
    if not hmac.compare_digest(hashlib.sha256(blob).hexdigest(), str(document.get("tensors_sha256"))):
        raise DetectorFileError(f"{directory / TENSOR_FILE} does not match its sha256 in {JSON_FILE}; refusing it.")
    try:
        tensors = load_tensors(blob)
    except Exception as exc:  # safetensors' own error type for a malformed header
        raise DetectorFileError(f"{directory / TENSOR_FILE} is not a safetensors file ({exc}); refusing it.") from None
    if document["includes_weights"]:
        state = {k[len(_WEIGHTS):]: v for k, v in tensors.items() if k.startswith(_WEIGHTS)}
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise DetectorFileError(f"The saved weights do not fit this backbone ({type(backbone).__name__}; saved: "
                                    f"{document['backbone_class']}): {str(exc).splitlines()[0]}") from None
    digest = weights_digest(backbone)
    if not hmac.compare_digest(digest, str(document["backbone_sha256"])):
        raise DetectorFileError("This backbone's weights are not the ones the detector was fitted with "
                                f"(sha256 {digest[:12]}..., saved {str(document['backbone_sha256'])[:12]}...).")
    decoder = _Decoder({k: v.numpy() for k, v in tensors.items() if not k.startswith(_WEIGHTS)}, backbone)
    return decoder.decode(document["estimator"])


def _check_loaded(estimator, directory):
    """Refuse a loaded estimator with a non-finite threshold or centroid, or one that cannot score its own input."""
    for est in _estimators(estimator):
        for name in ("offset_", "centroids_", "precision_", "whitening_"):
            value = est.__dict__.get(name)
            if value is not None and not np.isfinite(np.asarray(value, dtype=float)).all():
                raise DetectorFileError(f"{directory}: {type(est).__name__}.{name} is not finite, which no fit "
                                        "writes (a threshold of -inf would accept everything); refusing it.")
        centroids = est.__dict__.get("centroids_")
        if centroids is not None:  # a distance step: its arrays must agree on the feature count
            d = np.shape(centroids)[-1]
            wrong = [name for name, want in (("precision_", (d, d)), ("whitening_", (d, d)))
                     if est.__dict__.get(name) is not None and np.shape(est.__dict__[name]) != want]
            if np.ndim(centroids) != 2 or wrong or getattr(est, "n_features_in_", d) != d:
                raise DetectorFileError(f"{directory}: {type(est).__name__}'s fitted arrays disagree on the "
                                        f"feature count (centroids {np.shape(centroids)}, "
                                        f"{', '.join(wrong) or 'n_features_in_'}); refusing it.")
    shape = _input_shape(estimator)
    if shape is not None and hasattr(estimator, "score_samples"):
        try:
            scores = estimator.score_samples(np.zeros((1, *shape), np.float32))
            if np.shape(scores) != (1,):
                raise ValueError(f"{np.shape(scores)} scores for one input")
        except Exception as exc:
            raise DetectorFileError(f"{directory}: the loaded {type(estimator).__name__} cannot score an input of "
                                    f"its own fitted shape {tuple(shape)} ({type(exc).__name__}: {exc}); its "
                                    "fitted arrays disagree with one another. Refusing it.") from None


def _estimators(root):
    """``root`` and every estimator inside it (pipeline steps, detectors' parts), each once."""
    seen, stack = [], [root]
    while stack:
        est = stack.pop()
        if any(est is s for s in seen) or not hasattr(est, "__dict__") or isinstance(est, (torch.nn.Module, type)):
            continue
        seen.append(est)
        for value in est.__dict__.values():
            items = value.steps if isinstance(value, Pipeline) else [value]
            for item in items:
                item = item[1] if isinstance(item, tuple) and len(item) == 2 else item
                if hasattr(item, "get_params"):
                    stack.append(item)
    return seen


def _input_shape(estimator):
    """The shape of one input the fitted estimator takes, without the batch axis (None when unknown)."""
    pipeline = getattr(estimator, "pipeline_", None)
    if pipeline is not None and hasattr(pipeline[0], "input_shape_"):
        return tuple(pipeline[0].input_shape_)
    if hasattr(estimator, "input_shape_"):
        return tuple(estimator.input_shape_)
    return None  # a LogitDetector does not record its input size


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
                raise DetectorFileError(f"The file names {value['__estimator__']!r}, which is not an estimator this "
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
        raise DetectorFileError(f"Unexpected entry in the estimator file: {sorted(value)[:3]}.")
