"""The split's artifacts: writing them (torch.export .pt2, ONNX, ExecuTorch .pte, int8) and loading them safely.

The files need neither scikit-learn nor this package to run: ``edge.pt2``
loads with ``torch.export.load``, ``edge.onnx`` runs in onnxruntime and
``edge.pte`` in the ExecuTorch runtime. The edge files return the flat tuple
``(is_id, score, *payload)``, the cloud file takes ``*payload`` and returns
the model's output.

``split.json`` lists the sha256 of every file, the cut, the payload and,
per edge file, its runtime, precision and threshold (``edge_programs``); its
``version`` is the sha256 of all of that, so two splits that differ in any
file or in the cut never share a version. :func:`load_split` refuses a
directory whose manifest, files or (with a key) HMAC signature do not match,
and refuses a ``.pt2`` archive holding anything that ``torch.export.load``
would unpickle (pickled weights or constants, custom objects, sample inputs
that need more than ``weights_only`` loading). The manifest's rules live in
``earlin_sklearn/edge/_manifest.py``, which the device side shares.
"""

import copy
import inspect
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch

from ._cost import count_flops
from ._device_formats import (FlatEdge, check_int8_threshold, drop_last_output, executorch_program,
                              int8_acceptance, int8_edge, int8_onnx_edge, onnx_program, set_onnx_threshold,
                              strip_metadata)
from ._edge import CloudModule, ProgramCloud, ProgramEdge, Split
from ._pt2 import check_code_free_pt2, load_pt2  # noqa: F401
from ._threshold import offset_for_tpr
from ._typing import Key
from ._typing import Path as PathType
from .edge._manifest import (MANIFEST, SPLIT_FORMAT, check_payload, check_seal, file_sha256,  # noqa: F401
                             read_manifest, seal, verified_bytes)
from .exceptions import EarlinDeprecationWarning, SplitVerificationError

FORMATS = ("pt2", "onnx")  # the default: what the server and a PyTorch or ONNX Runtime edge read
ALL_FORMATS = ("pt2", "onnx", "pte", "onnx-int8", "pte-int8")
PARTS = ("edge", "cloud")
# the file each edge format writes, and what its manifest entry says of it
EDGE_FILES = {"pt2": ("edge.pt2", "torch", "float32"), "onnx": ("edge.onnx", "onnxruntime", "float32"),
              "pte": ("edge.pte", "executorch", "float32"), "onnx-int8": ("edge.int8.onnx", "onnxruntime", "int8"),
              "pte-int8": ("edge.int8.pte", "executorch", "int8")}


def save_split(edge: torch.nn.Module, cloud: torch.nn.Module, directory: PathType, example_input: Any,
               formats: Sequence[str] = FORMATS, *, preprocessing: "dict | None" = None, key: Key = None,
               calibration: Any = None, threshold_data: Any = None, int8_threshold: str = "match") -> dict:
    """Write the edge and cloud modules as deployable files.

    Parameters
    ----------
    edge : EdgeModule
    cloud : CloudModule
        From :meth:`ShallowFeatureOODDetector.export_split`.
    directory : str or Path
        Created if missing. Receives the files of ``formats`` and ``split.json``.
    example_input : tensor of shape (N, C, H, W)
        A batch of valid inputs; the batch dimension stays dynamic in the
        ``.pt2`` and ONNX files (``.pte`` programs take one input at a time).
    formats : sequence of {"pt2", "onnx", "pte", "onnx-int8", "pte-int8"}, default=("pt2", "onnx")
        ``"pt2"``: ``edge.pt2``/``cloud.pt2`` (torch.export; the server reads
        these). ``"onnx"``: ``edge.onnx``/``cloud.onnx`` (``pip install
        earlin_sklearn[export]``). ``"pte"``: ``edge.pte``, an ExecuTorch
        program lowered to XNNPACK (``pip install executorch``).
        ``"onnx-int8"``, ``"pte-int8"``: ``edge.int8.onnx``,
        ``edge.int8.pte``, the edge with its backbone prefix quantized to int8
        on ``calibration`` (the detector head stays float, shifted by the
        mean bias quantization gives the pooled features on ``calibration``).
    preprocessing : dict, default=None
        How raw images become the model input (e.g. ``{"mean": [...], "std":
        [...]}``), recorded in the manifest for the edge runner and server.
    key : bytes or str, default=None
        Signs the manifest with HMAC-SHA256; :func:`load_split` given the
        same key refuses a split that was not signed with it.
    calibration : array-like of shape (n, C, H, W), default=None
        ID inputs (normalized like ``example_input``; never OOD data) whose
        activations set the int8 ranges and the pooled features' bias
        correction. Needed by the int8 formats; a few thousand images are
        better than a few hundred (ShuffleNetV2's ``.pte`` agreed with the
        float decisions on 99.3% of the inputs with 2,048, 99.0% with 512).
    threshold_data : array-like of shape (m, C, H, W), default=None
        Held-out ID inputs that the detector was not fitted on, on which each
        int8 program's threshold is set (on that program's own scores). None:
        on the ``calibration`` images.
    int8_threshold : {"match", "target_tpr"}, default="match"
        What share of those images each int8 program accepts. ``"match"``: as
        many as the float threshold does, so the int8 programs decide where
        the float detector does (that threshold was set for the target TPR on
        out-of-fold training scores). ``"target_tpr"``: ``edge.target_tpr`` of
        ``threshold_data`` (needed), a TPR estimate of the int8 program's own:
        on ResNet-20 that alone moves 3.1% of even the float detector's
        decisions (0.5% and 0.1% on ResNet-56 and ShuffleNetV2).

    Returns
    -------
    paths : dict
        ``{"edge.pt2": Path, ..., "manifest": Path}``.

    Examples
    --------
    >>> import tempfile, numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector, load_split, save_split
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> folder = tempfile.mkdtemp()
    >>> paths = save_split(*det.export_split(), folder, X[:2], formats=("pt2",))
    >>> split = load_split(folder, as_split=True)  # verified: hashes, version, no pickles
    >>> split.manifest["cut"]["layer"], len(split.manifest["version"])
    ('layer1', 64)
    """
    if preprocessing is not None and not isinstance(preprocessing, dict):
        raise TypeError(f"preprocessing must be a dict (e.g. {{'mean': [...], 'std': [...]}}); got {type(preprocessing).__name__}.")
    formats = tuple(formats)
    unknown = set(formats) - set(ALL_FORMATS)
    if unknown:
        raise ValueError(f"formats must be among {ALL_FORMATS}; got {sorted(unknown)}.")
    int8 = [f for f in formats if f.endswith("-int8")]
    if int8:
        check_int8_threshold(int8_threshold, threshold_data is not None)
    if int8 and calibration is None:
        raise ValueError(f"formats {int8} quantize the edge prefix: pass calibration=ID inputs (a few thousand "
                         "images like the training data; never OOD data).")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    x = torch.as_tensor(example_input)
    if x.shape[0] < 2:  # a batch of 1 would be specialized as a constant
        x = torch.cat([x, x])
    x = x.detach().clone().contiguous()  # its own storage: torch.export.save stores a view's whole base tensor
    flat = FlatEdge(edge).eval()
    with torch.no_grad():
        outs = flat(x)
    payload = outs[2:]
    # a CloudModule exports its graph; a cloud part with its own detector (CloudHead) exports whole
    cloud_module = cloud.suffix if isinstance(cloud, CloudModule) else cloud
    with torch.no_grad():
        cloud_out = cloud_module(*payload)
    two_stage = isinstance(cloud_out, tuple) and len(cloud_out) == 3
    if not (isinstance(cloud_out, torch.Tensor) or two_stage):
        raise ValueError(f"The cloud part returns {type(cloud_out).__name__}, not a tensor: the cloud server answers "
                         "from a logits tensor. Wrap the backbone so that forward() returns the logits.")
    cloud_outputs = ["logits", "cloud_score", "cloud_is_id"] if two_stage else ["output"]
    batch = torch.export.Dim("batch", min=1)
    edge_shapes = ({0: batch},)
    cloud_shapes: tuple = tuple({0: batch} for _ in payload)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in inspect.signature(cloud_module.forward).parameters.values()):
        cloud_shapes = (cloud_shapes,)  # forward(*payload): torch.export sees one tuple argument
    edge_outputs = ["is_id", "score", *[f"payload_{i}" for i in range(len(payload))]]
    cloud_inputs = [f"payload_{i}" for i in range(len(payload))]
    offset = float(edge.head.offset)
    target_tpr = float(getattr(edge, "target_tpr", 0.95))
    paths, programs = {}, {}

    def write(name, data):
        paths[name] = directory / name
        paths[name].write_bytes(data)

    def edge_program(fmt, data, offset, batch=None, **extra):
        name, runtime, precision = EDGE_FILES[fmt]
        if data is not None:
            write(name, data)
        programs[name] = {"runtime": runtime, "precision": precision, "offset": float(offset), "batch": batch, **extra}

    if "pt2" in formats:
        for name, module, args, shapes in (("edge", flat, (x,), edge_shapes),
                                           ("cloud", cloud_module, tuple(payload), cloud_shapes)):
            paths[f"{name}.pt2"] = directory / f"{name}.pt2"  # the archive's folder is named after the file
            torch.export.save(torch.export.export(module, args, dynamic_shapes=shapes), paths[f"{name}.pt2"])
        edge_program("pt2", None, offset)
    onnx_edge = None  # with the pooled features as a last output, which the int8 bias correction reads
    if "onnx" in formats or "onnx-int8" in formats:
        onnx_edge = onnx_program(FlatEdge(edge, pooled=True).eval(), (x,), ["x"], [*edge_outputs, "pooled"],
                                 edge_shapes)
    if "onnx" in formats:
        float_onnx = drop_last_output(strip_metadata(copy.deepcopy(onnx_edge)))
        edge_program("onnx", float_onnx.SerializeToString(), offset)
        cloud_onnx = onnx_program(cloud_module, tuple(payload), cloud_inputs, cloud_outputs, cloud_shapes)
        write("cloud.onnx", strip_metadata(cloud_onnx).SerializeToString())
    if "pte" in formats:
        edge_program("pte", executorch_program(flat, x), offset, batch=1)
    if int8:
        from .edge._programs import EdgeProgram

        calibration = torch.as_tensor(np.asarray(calibration), dtype=torch.float32).contiguous()
        held_out = threshold_data is not None
        scored = torch.as_tensor(np.asarray(threshold_data), dtype=torch.float32).contiguous() if held_out else calibration
        rate, rule = int8_acceptance(edge, scored, target_tpr, int8_threshold, held_out)
        note = {"quantization_images": int(calibration.shape[0]), "threshold_images": int(scored.shape[0]),
                "bias_correction": "mean over the quantization images"}
        if "onnx-int8" in formats:
            quantized = int8_onnx_edge(edge, onnx_edge, calibration)
            probe = EdgeProgram("edge.int8.onnx", {"runtime": "onnxruntime"}, quantized.SerializeToString())
            new = offset_for_tpr(probe(scored.numpy())[1], rate)
            data = strip_metadata(set_onnx_threshold(quantized, new)).SerializeToString()
            edge_program("onnx-int8", data, new, **note, threshold_rule=rule)
        if "pte-int8" in formats:
            q = int8_edge(edge, calibration, x)
            probe = EdgeProgram("edge.int8.pte", {"runtime": "executorch", "batch": 1},
                                executorch_program(FlatEdge(q), x))
            new = offset_for_tpr(probe(scored.numpy())[1], rate)
            q.head.offset.fill_(new)  # the same quantized prefix, lowered again with its own threshold
            edge_program("pte-int8", executorch_program(FlatEdge(q), x), new, batch=1, **note, threshold_rule=rule)
    x1 = x[:1]
    edge_flops = count_flops(flat, x1)
    cloud_flops = count_flops(cloud_module, *[p[:1] for p in payload])
    payload_spec = [
        {"name": n, "shape": list(p.shape[1:]), "dtype": str(p.dtype).replace("torch.", "")}
        for n, p in zip(cloud_inputs, payload)
    ]
    manifest = {
        "format": SPLIT_FORMAT,
        "input_shape": list(x.shape[1:]),
        "input_dtype": str(x.dtype).replace("torch.", ""),
        "preprocessing": preprocessing,
        "cut": {"layer": getattr(edge, "layer", None), "extra_layers": list(getattr(edge, "extra_layers", [])),
                "settled": dict(getattr(edge.prefix, "settled", {}))},
        "pooling": edge.pooling,
        "layout": edge.layout,
        "metric": edge.head.metric,
        "offset": offset,
        "target_tpr": target_tpr,
        "edge_programs": programs,
        "cloud_detector": {"method": cloud.method, "offset": float(cloud.offset), "temperature": cloud.temperature,
                           **({"k": cloud.k, "bank_size": int(cloud.bank.shape[0])} if cloud.k is not None else {})}
        if two_stage else None,
        "payload": payload_spec,
        "flops": {"edge": edge_flops, "cloud": cloud_flops, "full": edge_flops + cloud_flops},
        "files": {name: file_sha256(path) for name, path in sorted(paths.items())},
    }
    seal(manifest, key)
    paths["manifest"] = directory / MANIFEST
    paths["manifest"].write_text(json.dumps(manifest, indent=2))
    return paths


@overload
def load_split(directory: PathType, parts: Sequence[str] = ..., key: Key = ..., *,
               as_split: Literal[True]) -> Split: ...
@overload
def load_split(directory: PathType, parts: Sequence[str] = ..., key: Key = ..., *,
               as_split: "Literal[False] | None" = ...) -> "tuple[dict, torch.nn.Module | None, torch.nn.Module | None]": ...
def load_split(directory: PathType, parts: Sequence[str] = PARTS, key: Key = None, *,
               as_split: "bool | None" = None) -> Any:
    """A split written by :func:`save_split`, verified: the :class:`Split` ``(edge, cloud)`` with its manifest.

    Every loaded file is checked against the sha256 in the manifest, the
    manifest against its version (and, with ``key``, its HMAC signature), and
    each ``.pt2`` archive for content whose loading would run code. Only the
    requested ``parts`` are read: an edge device loads ``parts=("edge",)``.

    Parameters
    ----------
    directory : str or Path
    parts : sequence of {"edge", "cloud"}, default=("edge", "cloud")
    key : bytes or str, default=None
        Require a signature made with this key (see :func:`save_split`).
    as_split : bool, default=None
        ``True``: return a :class:`Split`, as ``export_split`` does (the
        default from 0.3). ``False``: the tuple ``(manifest, edge, cloud)``
        of 0.1, whose edge returns the flat tuple ``(is_id, score, *payload)``.
        None: that tuple, with a ``FutureWarning``.

    Returns
    -------
    split : Split
        ``edge, cloud = split``; ``split.manifest`` is the verified manifest.
        ``edge(x)`` returns :class:`EdgeOutput` (``is_id``, ``score``,
        ``payload``), as the exported edge does; ``cloud(payload)`` (a tensor
        or a tuple of them) the model's output. A part not requested is None.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> import tempfile
    >>> from earlin_sklearn import load_split, save_split
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_split(*det.export_split(), folder, X[:2], formats=("pt2",), key=b"a key of 16+ bytes")
    >>> edge, cloud = load_split(folder, parts=("edge",), key=b"a key of 16+ bytes", as_split=True)  # as a device does
    >>> out = edge(X[:3])
    >>> cloud is None, np.allclose(out.score.numpy(), det.score_samples(X[:3].numpy()), atol=1e-6)
    (True, True)
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"parts must be among {PARTS}; got {sorted(unknown)}.")
    manifest = read_manifest(directory, key)
    loaded = {}
    for part in PARTS:
        if part in parts:
            name = f"{part}.pt2"
            # read once: what is checked is what is loaded
            loaded[part] = load_pt2(Path(directory) / name, verified_bytes(directory, manifest, name))
    check_cut(manifest, loaded.get("edge"), loaded.get("cloud"))
    edge, cloud = loaded.get("edge"), loaded.get("cloud")
    if as_split:
        return Split(None if edge is None else ProgramEdge(edge), None if cloud is None else ProgramCloud(cloud),
                     manifest)
    if as_split is None:
        warnings.warn("load_split returns (manifest, edge, cloud), whose edge returns a flat tuple; from 0.3 it "
                      "returns a Split like export_split: `edge, cloud = load_split(d)`, `.manifest`, and "
                      "edge(x) -> EdgeOutput. Pass as_split=True for that now, or as_split=False to keep the tuple.",
                      EarlinDeprecationWarning, stacklevel=2)
    return manifest, edge, cloud


_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "int8",
                                              "bool")}


def check_cut(manifest, edge=None, cloud=None):
    """Refuse at load a manifest whose cut (input shape, payload names, shapes, dtypes) the programs do not have.

    The edge runs on two zero inputs of the manifest's ``input_shape`` and
    must return the payload it lists; the cloud must take that payload.
    """
    try:
        shapes = [(2, *p["shape"]) for p in manifest["payload"]]
        dtypes = [_DTYPES[p["dtype"]] for p in manifest["payload"]]
        input_shape = (2, *manifest["input_shape"])
    except (TypeError, KeyError):
        raise SplitVerificationError(f"{MANIFEST}: input_shape or payload is malformed.") from None
    with torch.inference_mode():
        if edge is not None:
            try:
                _, _, *payload = edge(torch.zeros(input_shape))
            except Exception as exc:
                raise SplitVerificationError(f"edge.pt2 does not run on {MANIFEST}'s input_shape "
                                             f"{list(input_shape[1:])}: {exc}") from None
            check_payload(manifest, [(p.shape[1:], str(p.dtype).replace("torch.", "")) for p in payload], "edge.pt2")
        if cloud is not None:
            try:
                cloud(*[torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes)])
            except Exception as exc:
                raise SplitVerificationError(f"cloud.pt2 does not take the payload {MANIFEST} lists: {exc}") from None
