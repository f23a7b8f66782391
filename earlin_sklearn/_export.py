"""The split's artifacts: writing them (torch.export .pt2, ONNX, a JSON manifest) and loading them safely.

The files need neither scikit-learn nor this package to run: ``edge.pt2``
loads with ``torch.export.load`` and ``edge.onnx`` runs in onnxruntime.
The edge file returns the flat tuple ``(is_id, score, *payload)``, the cloud
file takes ``*payload`` and returns the model's output.

``split.json`` lists the sha256 of every file, the cut and the payload; its
``version`` is the sha256 of all of that, so two splits that differ in any
file or in the cut never share a version. :func:`load_split` refuses a
directory whose manifest, files or (with a key) HMAC signature do not match,
and refuses a ``.pt2`` archive holding anything that ``torch.export.load``
would unpickle (pickled weights or constants, custom objects, sample inputs
that need more than ``weights_only`` loading): loading a split never runs code
from the files.
"""

import hashlib
import hmac
import inspect
import io
import json
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from ._cost import count_flops
from ._edge import CloudModule
from .exceptions import SplitVerificationError

FORMATS = ("pt2", "onnx")
PARTS = ("edge", "cloud")
MANIFEST = "split.json"
SPLIT_FORMAT = "earlin-split/2"
_MAX_MANIFEST_BYTES = 1 << 20


class FlatEdge(nn.Module):
    """:class:`EdgeModule` with a flat tuple output ``(is_id, score, *payload)``.

    Exported files cannot carry the :class:`EdgeOutput` named tuple (loading
    it would need this package), so the exported edge returns plain tensors.
    """

    def __init__(self, edge):
        super().__init__()
        self.edge = edge

    def forward(self, x):
        out = self.edge(x)
        payload = out.payload if isinstance(out.payload, tuple) else (out.payload,)
        return (out.is_id, out.score, *payload)


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(manifest):
    """The manifest's bytes that its version and signature cover (everything but those two)."""
    body = {k: v for k, v in manifest.items() if k not in ("version", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _key_bytes(key):
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes) or len(key) < 16:
        raise ValueError("A signing key must be bytes or str of at least 16 bytes (e.g. secrets.token_bytes(32)).")
    return key


def _signature(manifest, key):
    return hmac.new(_key_bytes(key), _canonical(manifest), hashlib.sha256).hexdigest()


def seal(document, key=None):
    """Add ``version`` (sha256 of the document) and, with ``key``, an HMAC-SHA256 ``signature``; return it."""
    document["version"] = hashlib.sha256(_canonical(document)).hexdigest()
    if key is not None:
        document["signature"] = _signature(document, key)
    return document


def check_seal(document, key, path, writer):
    """Refuse a document (read from ``path``, written by ``writer``) modified since, or not signed with ``key``."""
    if document.get("version") != hashlib.sha256(_canonical(document)).hexdigest():
        raise SplitVerificationError(f"{path} was modified after {writer} wrote it (its version does not match "
                                     "its contents); refusing it.")
    if key is not None:
        signature = document.get("signature")
        if not isinstance(signature, str) or not hmac.compare_digest(signature, _signature(document, key)):
            raise SplitVerificationError(f"{path} is {'not signed' if signature is None else 'signed with another key'}: "
                                         "refusing a file its owner did not sign.")


def save_split(edge, cloud, directory, example_input, formats=FORMATS, *, preprocessing=None, key=None):
    """Write the edge and cloud modules as deployable files.

    Parameters
    ----------
    edge : EdgeModule
    cloud : CloudModule
        From :meth:`ShallowFeatureOODDetector.export_split`.
    directory : str or Path
        Created if missing. Receives ``edge.pt2``/``cloud.pt2`` (torch.export),
        ``edge.onnx``/``cloud.onnx`` and ``split.json``.
    example_input : tensor of shape (N, C, H, W)
        A batch of valid inputs; the batch dimension stays dynamic in the files.
    formats : sequence of {"pt2", "onnx"}, default=("pt2", "onnx")
        ONNX needs the ``onnx`` and ``onnxscript`` packages (``pip install earlin_sklearn[export]``).
    preprocessing : dict, default=None
        How raw images become the model input (e.g. ``{"mean": [...], "std":
        [...]}``), recorded in the manifest for the edge runner and server.
    key : bytes or str, default=None
        Signs the manifest with HMAC-SHA256; :func:`load_split` given the
        same key refuses a split that was not signed with it.

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
    >>> manifest, edge, cloud = load_split(folder)  # verified: hashes, version, no pickles
    >>> manifest["cut"]["layer"], len(manifest["version"])
    ('layer1', 64)
    """
    if preprocessing is not None and not isinstance(preprocessing, dict):
        raise TypeError(f"preprocessing must be a dict (e.g. {{'mean': [...], 'std': [...]}}); got {type(preprocessing).__name__}.")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats must be among {FORMATS}; got {sorted(unknown)}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    x = torch.as_tensor(example_input)
    if x.shape[0] < 2:  # a batch of 1 would be specialized as a constant
        x = torch.cat([x, x])
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
    cloud_shapes = tuple({0: batch} for _ in payload)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in inspect.signature(cloud_module.forward).parameters.values()):
        cloud_shapes = (cloud_shapes,)  # forward(*payload): torch.export sees one tuple argument
    input_names = ["x"]
    edge_outputs = ["is_id", "score", *[f"payload_{i}" for i in range(len(payload))]]
    cloud_inputs = [f"payload_{i}" for i in range(len(payload))]
    paths = {}
    if "pt2" in formats:
        for name, module, args, shapes in (
            ("edge", flat, (x,), edge_shapes),
            ("cloud", cloud_module, tuple(payload), cloud_shapes),
        ):
            program = torch.export.export(module, args, dynamic_shapes=shapes)
            paths[f"{name}.pt2"] = directory / f"{name}.pt2"
            torch.export.save(program, paths[f"{name}.pt2"])
    if "onnx" in formats:
        from ._optional import require

        require("save_split(formats=('onnx', ...))", "export", "onnx", "onnxscript")
        with warnings.catch_warnings():
            # the exporter's notes on renamed dynamic axes are not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            for name, module, args, shapes, ins, outs_ in (
                ("edge", flat, (x,), edge_shapes, input_names, edge_outputs),
                ("cloud", cloud_module, tuple(payload), cloud_shapes, cloud_inputs, cloud_outputs),
            ):
                paths[f"{name}.onnx"] = directory / f"{name}.onnx"
                torch.onnx.export(
                    module, args, str(paths[f"{name}.onnx"]), dynamo=True, dynamic_shapes=shapes,
                    input_names=ins, output_names=outs_, verbose=False,
                )
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
        "offset": float(edge.head.offset),
        "cloud_detector": {"method": cloud.method, "offset": float(cloud.offset), "temperature": cloud.temperature}
        if two_stage else None,
        "payload": payload_spec,
        "flops": {"edge": edge_flops, "cloud": cloud_flops, "full": edge_flops + cloud_flops},
        "files": {name: _file_sha256(path) for name, path in sorted(paths.items())},
    }
    seal(manifest, key)
    paths["manifest"] = directory / MANIFEST
    paths["manifest"].write_text(json.dumps(manifest, indent=2))
    return paths


def read_manifest(directory, key=None):
    """The verified manifest of a split directory (its version recomputed; its signature checked with ``key``).

    Raises
    ------
    SplitVerificationError
        If the manifest is malformed, from another format, modified after it
        was written, or not signed with ``key``.
    """
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass a directory written by earlin_sklearn.save_split.")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise SplitVerificationError(f"{path} is over {_MAX_MANIFEST_BYTES} bytes: not a split manifest.")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SplitVerificationError(f"{path} is not valid JSON: {exc}.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SPLIT_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise SplitVerificationError(f"{path} has format {got!r}; this earlin_sklearn reads {SPLIT_FORMAT!r}. "
                                     "Export the split again with save_split.")
    if not isinstance(manifest.get("files"), dict):
        raise SplitVerificationError(f"{path} lists no files: not a split manifest.")
    check_seal(manifest, key, path, "save_split")
    return manifest


def verified_bytes(directory, manifest, name):
    """The bytes of ``name`` in the split, read once and checked against its sha256 in the manifest."""
    path = Path(directory) / name
    expected = manifest["files"].get(name)
    if expected is None:
        raise SplitVerificationError(f"{name} is not listed in {MANIFEST}: save_split did not write it.")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (listed in {MANIFEST}).")
    data = path.read_bytes()
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), expected):
        raise SplitVerificationError(f"{path} does not match its sha256 in {MANIFEST} (swapped, truncated or "
                                     "modified); refusing it.")
    return data


_PT2_MEMBER = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json|data/weights/[\w.-]+|data/constants/[\w.-]+|data/sample_inputs/[\w.-]+\.pt)"
)


def check_code_free_pt2(path, data=None):
    """Refuse a ``.pt2`` archive (at ``path``, or its bytes ``data``) from which ``torch.export.load``
    would unpickle anything.

    torch.export.load unpickles (with ``weights_only=False``) weights or
    constants marked ``use_pickle``, custom and opaque objects, and any
    ``torch.save`` member (sample inputs; the weights themselves in torch
    2.8 and older archives) that ``weights_only`` loading refuses. This check
    allows only the members torch.export.save writes for plain tensors, reads
    their configs without unpickling anything, and requires every ``.pt``
    member to load with ``weights_only=True``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if data is not None else path)
    except zipfile.BadZipFile:
        raise SplitVerificationError(f"{path} is not a .pt2 archive.") from None
    with archive:
        names = archive.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1:
            raise SplitVerificationError(f"{path} has several top-level folders {sorted(roots)}: not a .pt2 from save_split.")
        for name in names:
            member = name.split("/", 1)[1] if "/" in name else ""
            if not _PT2_MEMBER.fullmatch(member):
                raise SplitVerificationError(f"{path} holds an unexpected member {name!r}; refusing it.")
            if member.endswith("_config.json"):
                config = json.loads(archive.read(name)).get("config", {})
                prefix = "weight_" if "/weights/" in member else "tensor_"
                for entry, meta in config.items():
                    if meta.get("use_pickle", False) or not str(meta.get("path_name", "")).startswith(prefix):
                        raise SplitVerificationError(
                            f"{path}: {entry!r} is stored as a pickle or a custom object, which loading would "
                            "execute; refusing it. save_split writes plain tensors only.")
            elif member.endswith(".pt"):  # torch.save archives (sample inputs; weights/constants in older torch)
                try:  # the restricted unpickler: no code; torch itself would fall back to a full unpickle
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:
                    raise SplitVerificationError(f"{path}: {name!r} needs more than weights-only loading, which "
                                                 "would run code; refusing it.") from None


def load_split(directory, parts=PARTS, key=None):
    """``(manifest, edge, cloud)`` from a directory written by :func:`save_split`, verified.

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

    Returns
    -------
    manifest : dict
    edge, cloud : torch.nn.Module or None
        The exported programs' modules; None for a part not requested.

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
    >>> manifest, edge, cloud = load_split(folder, parts=("edge",), key=b"a key of 16+ bytes")  # as a device does
    >>> is_id, score, *payload = edge(X[:3])
    >>> cloud is None, np.allclose(score.numpy(), det.score_samples(X[:3].numpy()), atol=1e-6)
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
            data = verified_bytes(directory, manifest, name)  # read once: what is checked is what is loaded
            check_code_free_pt2(Path(directory) / name, data)
            loaded[part] = torch.export.load(io.BytesIO(data)).module()
    return manifest, loaded.get("edge"), loaded.get("cloud")
