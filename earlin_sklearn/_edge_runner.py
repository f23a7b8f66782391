"""The edge runner: decide ID/OOD on the device, upload only ID inputs to the cloud server."""

import itertools
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ._protocol import (ENCODINGS, HEADER_BATCH, HEADER_COMPRESSION, HEADER_ENCODING, HEADER_VERSION, compress, encode,
                        encode_image, encoded_size,
                        preprocess, transfer_seconds)
from ._constants import COMPRESSIONS, IMAGE_FORMATS, UPLOADS
from ._export import load_split
from .exceptions import EarlinWarning

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 409, 428}  # configuration errors: every later upload would fail the same way

logger = logging.getLogger(__name__)


@dataclass
class EdgeRecord:
    """What happened to one input."""

    index: int
    is_id: bool
    score: float
    uploaded: str  # "activations", "raw" or "" (rejected as OOD: nothing sent)
    bytes_sent: int
    latency_ms: float
    prediction: int  # the cloud's prediction, -1 when nothing was sent
    label: int = -1
    status: str = "ok"  # "ok", or "failed" (the upload failed after every retry; `error` says why)
    error: str = ""
    attempts: int = 0  # HTTP requests made for this input
    cloud_is_id: object = None  # the cloud stage's verdict (TwoStageDetector splits); None without one


class CloudRefused(RuntimeError):
    """The server refused the runner itself (token, split version): no later upload can succeed."""


def choose_upload(manifest, encoding="float32", uplink_mbit_s=10.0, cloud_gflop_s=1000.0, act_bytes=None,
                  raw_bytes=None):
    """The cost model's choice for an accepted input: ``"activations"`` or ``"raw"``.

    Edge compute is the same either way, so the choice is the cheaper of
    (payload transfer + cloud part) and (input transfer + whole model).
    ``act_bytes`` and ``raw_bytes`` are the two bodies' sizes when they were
    measured (compressed bodies: their size depends on the input); by
    default, the uncompressed sizes in ``encoding``.
    """
    payload_shapes = [p["shape"] for p in manifest["payload"]]
    if act_bytes is None:
        act_bytes = encoded_size(payload_shapes, 1, encoding)
    if raw_bytes is None:
        raw_bytes = encoded_size([manifest["input_shape"]], 1, encoding)
    fps = cloud_gflop_s * 1e9
    t_act = transfer_seconds(act_bytes, uplink_mbit_s) + manifest["flops"]["cloud"] / fps
    t_raw = transfer_seconds(raw_bytes, uplink_mbit_s) + manifest["flops"]["full"] / fps
    return "activations" if t_act <= t_raw else "raw"


class EdgeRunner:
    """Runs the exported edge part and talks to ``earlin serve-cloud``.

    Parameters
    ----------
    split_dir : str or Path
        Directory written by :func:`save_split` (the same files as the server's).
    url : str
        Base URL of the cloud server, e.g. ``"http://127.0.0.1:8000"``.
    upload : {"activations", "raw", "auto"}, default="auto"
        What an accepted input sends: the cut activations, the input itself
        (the cloud then runs the whole model), or the cost model's choice
        (``choose_upload``).
    encoding : {"float32", "float16", "int8", "png", "jpeg"}, default="float32"
        Wire encoding of what is sent. ``"png"`` (lossless) and ``"jpeg"``
        upload the camera image itself as a file (``upload="raw"``); they
        need uint8 images ``(H, W, C)`` as inputs and a split saved with its
        ``preprocessing``, which the runner applies for the edge part and the
        server for the whole model.
    jpeg_quality : int, default=90
    compression : {"none", "zstd"}, default="none"
        Entropy-code tensor bodies with Zstandard (``pip install zstandard``
        on both sides); not for image files, which are compressed already.
        With ``upload="auto"``, the choice between activations and the raw
        tensor is then made on the first accepted input, from the sizes of
        its two compressed bodies.
    token : str, default=None
        Bearer token of the server.
    uplink_mbit_s, cloud_gflop_s : float
        For ``upload="auto"``.
    timeout : float, default=30
        Seconds per request.
    retries : int, default=5
        Further attempts after a timeout, a dropped connection or a 408/429/5xx
        answer, with exponential backoff (``backoff * 2**attempt`` seconds, at
        most 30). An input whose upload still fails is recorded with
        ``status="failed"`` and the run goes on; a rerun with ``resume=True``
        retries only those.
    backoff : float, default=0.5
    key : bytes or str, default=None
        Run only a split signed with this key (see :func:`save_split`).

    Examples
    --------
    >>> import tempfile, numpy as np, torch
    >>> from earlin_sklearn import EdgeRunner, ShallowFeatureOODDetector, save_split
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_split(*det.export_split(), folder, X[:2], formats=("pt2",))
    >>> runner = EdgeRunner(folder, "http://127.0.0.1:8000", upload="auto")  # nothing is sent yet
    >>> runner.upload  # the cost model's choice: a ResNet-20 layer1 payload is 21x the input
    'raw'
    >>> runner.close()

    With ``earlin serve-cloud FOLDER`` running at that address,
    ``runner.run(images, log="edge_log.jsonl")`` decides on each input and
    uploads the accepted ones.
    """

    def __init__(self, split_dir, url, upload="auto", encoding="float32", token=None,
                 uplink_mbit_s=10.0, cloud_gflop_s=1000.0, timeout=30.0, key=None, retries=5, backoff=0.5,
                 jpeg_quality=90, compression="none"):
        from ._optional import require

        (httpx,) = require("EdgeRunner", "serve", "httpx")

        if upload not in UPLOADS:
            raise ValueError(f"upload must be one of {UPLOADS}; got {upload!r}.")
        if encoding not in ENCODINGS + IMAGE_FORMATS:
            raise ValueError(f"encoding must be one of {ENCODINGS + IMAGE_FORMATS}; got {encoding!r}.")
        if encoding in IMAGE_FORMATS and upload == "activations":
            raise ValueError(f"encoding={encoding!r} uploads the image file: use upload='raw' (or 'auto').")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}; got {compression!r}.")
        if compression != "none" and encoding in IMAGE_FORMATS:
            raise ValueError(f"{encoding} files are compressed already: use compression='none'.")
        if compression != "none":
            compress(b"", compression)  # a missing zstandard is named now, not at the first upload
        self.compression = compression
        self._choose = dict(encoding=encoding, uplink_mbit_s=uplink_mbit_s, cloud_gflop_s=cloud_gflop_s)
        self.jpeg_quality = int(jpeg_quality)
        if int(retries) < 0 or backoff < 0 or timeout <= 0:
            raise ValueError("retries and backoff must be >= 0 and timeout > 0.")
        self.retries, self.backoff = int(retries), float(backoff)
        self.manifest, self.edge, _ = load_split(split_dir, parts=("edge",), key=key)
        if encoding in IMAGE_FORMATS and self.manifest.get("preprocessing") is None:
            raise ValueError("image uploads need a split saved with save_split(..., preprocessing={'mean': ..., "
                             "'std': ...}): the server turns the file into the model input with it.")
        if encoding in IMAGE_FORMATS:
            self.upload = "raw"
        elif upload == "auto" and compression != "none":
            self.upload = "auto"  # decided on the first accepted input, from measured sizes
        else:
            self.upload = choose_upload(self.manifest, encoding, uplink_mbit_s, cloud_gflop_s) if upload == "auto" else upload
        self.encoding = encoding
        headers = {HEADER_ENCODING: encoding, HEADER_VERSION: self.manifest["version"], HEADER_BATCH: "1",
                   HEADER_COMPRESSION: compression, "Content-Type": "application/octet-stream"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self):
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def process(self, x, index=0, label=-1):
        """Decide on one input and upload it if it is ID (with retries).

        ``x`` is a model input ``(C, H, W)``, or, with an image encoding, a
        uint8 camera image ``(H, W, C)`` that the split's preprocessing turns
        into one.
        """
        t0 = time.perf_counter()
        image = None
        if self.encoding in IMAGE_FORMATS:
            image = np.asarray(x)
            if image.dtype != np.uint8:
                raise ValueError(f"input {index}: encoding={self.encoding!r} uploads camera images: pass uint8 "
                                 f"(H, W, C) pixels; got {image.dtype}.")
            x = preprocess(image, self.manifest["input_shape"], self.manifest["preprocessing"])
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        expected = tuple(self.manifest["input_shape"])
        if tuple(x.shape) != expected:
            raise ValueError(f"input {index} has shape {tuple(x.shape)}; the split expects {expected} (C, H, W).")
        x = x[None]
        with torch.inference_mode():
            is_id, score, *payload = self.edge(x)
        accepted = bool(is_id[0])
        record = EdgeRecord(index, accepted, float(score[0]), "", 0, 0.0, -1, int(label))
        if accepted:
            if image is not None:
                record.uploaded = self.upload
                body = encode_image(image, self.encoding, self.jpeg_quality)
            else:
                bodies = {}
                if self.upload == "auto":  # first accepted input: measure both compressed bodies, decide once
                    bodies = {kind: compress(encode(t, self.encoding), self.compression)
                              for kind, t in (("activations", payload), ("raw", [x]))}
                    self.upload = choose_upload(self.manifest, act_bytes=len(bodies["activations"]),
                                                raw_bytes=len(bodies["raw"]), **self._choose)
                record.uploaded = self.upload
                body = bodies.get(self.upload) or compress(
                    encode(payload if self.upload == "activations" else [x], self.encoding), self.compression)
            self._upload(record, body)
        record.latency_ms = 1e3 * (time.perf_counter() - t0)
        return record

    def _upload(self, record, body):
        import httpx

        for attempt in range(self.retries + 1):
            record.attempts = attempt + 1
            try:
                response = self.client.post(f"/v1/{record.uploaded}", content=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                record.error = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    answer = response.json()
                    record.prediction, record.bytes_sent, record.error = int(answer["predictions"][0]), len(body), ""
                    if "cloud_is_id" in answer:
                        record.cloud_is_id = bool(answer["cloud_is_id"][0])
                    return
                detail = response.text[:200]
                if response.status_code in FATAL_STATUS:
                    raise CloudRefused(f"cloud server answered {response.status_code}: {detail}")
                record.error = f"HTTP {response.status_code}: {detail}"
                if response.status_code not in RETRY_STATUS:
                    break  # this input is refused; retrying it would not help
            if attempt < self.retries:
                delay = min(30.0, self.backoff * 2**attempt)
                logger.warning("input %d: %s; retrying in %.1f s", record.index, record.error, delay)
                time.sleep(delay)
        record.status = "failed"
        record.bytes_sent = 0

    def run(self, inputs, labels=None, log=None, resume=False):
        """Process a stream of inputs, writing one JSON line per input to ``log`` as it goes.

        Parameters
        ----------
        inputs : iterable of tensors/arrays (C, H, W), or a tensor/array (N, C, H, W)
            A generator is fine: inputs are read one at a time, so memory
            stays bounded whatever the stream's length.
        labels : iterable of int, default=None
            Must have as many items as ``inputs``.
        log : str or Path, default=None
            JSON Lines file, flushed after every input, so a crash loses at
            most the input in flight.
        resume : bool, default=False
            Continue a run from ``log``: inputs recorded there with
            ``status="ok"`` are not processed again; the log is rewritten
            with those records, then every other input's.

        Returns
        -------
        records : list of EdgeRecord
            One per input, in input order. Check ``status``: uploads that
            failed after every retry are ``"failed"``.
        """
        done = {}
        if resume:
            if log is None:
                raise ValueError("resume=True needs the log of the earlier run.")
            done = {r.index: r for r in read_log(log) if r.status == "ok"} if Path(log).exists() else {}
        missing = object()
        pairs = ((x, -1) for x in inputs) if labels is None else itertools.zip_longest(inputs, labels, fillvalue=missing)
        records = []
        out = None
        if log is not None:
            tmp = Path(f"{log}.tmp")
            with open(tmp, "w") as f:  # the kept records first, then the new ones are appended
                for r in sorted(done.values(), key=lambda r: r.index):
                    f.write(json.dumps(asdict(r)) + "\n")
            os.replace(tmp, log)
            out = open(log, "a")
        try:
            for i, (x, label) in enumerate(pairs):
                if x is missing or label is missing:
                    raise ValueError(f"inputs and labels differ in length: one of them ended at item {i}.")
                if i in done:
                    records.append(done[i])
                    continue
                record = self.process(x, i, -1 if labels is None else int(label))
                records.append(record)
                if out is not None:
                    out.write(json.dumps(asdict(record)) + "\n")
                    out.flush()
        finally:
            if out is not None:
                out.close()
        return records


def read_log(path):
    """The :class:`EdgeRecord` list of a run's JSON Lines log (a last, partly written line is ignored)."""
    names = {f.name for f in fields(EdgeRecord)}
    records = []
    with open(path) as f:
        for line in f:
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that input is processed again
            records.append(EdgeRecord(**{k: v for k, v in data.items() if k in names}))
    return records


def read_inputs(source, mean=None, std=None, keep_uint8=False):
    """Inputs for the edge runner from an ``.npz`` file or a directory of images.

    An npz holds ``x`` (uint8 NHWC or float NCHW) and optionally ``y``; image
    files (PNG, JPEG, ...) are read with Pillow. uint8 pixels are scaled to
    [0, 1], then normalized with ``mean``/``std`` (per channel) when given.

    With ``keep_uint8=True`` uint8 pixels come back as they are, ``(N, H, W,
    C)`` (for image uploads, where the split's preprocessing applies).

    Returns
    -------
    X : torch.Tensor of shape (N, C, H, W), float32 (or uint8 ndarray (N, H, W, C))
    y : ndarray of shape (N,) or None
    """
    source = Path(source)
    y = None
    if source.is_dir():
        from PIL import Image

        entries = sorted(p for p in source.iterdir() if p.is_file())
        files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        for skipped in sorted(set(entries) - set(files)):
            warnings.warn(f"{skipped} is skipped: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}).",
                          EarlinWarning, stacklevel=2)
        if not files:
            raise ValueError(f"no image files in {source}")
        x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    else:
        data = np.load(source)
        x = data["x"]
        y = data["y"] if "y" in data else None
    if y is not None and len(y) != len(x):
        raise ValueError(f"{source}: y has {len(y)} labels for {len(x)} images.")
    if keep_uint8:
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"{source}: image uploads need uint8 images (N, H, W, C); got {x.dtype} {x.shape}.")
        return x, y
    if x.dtype == np.uint8:
        X = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 if x.shape[-1] in (1, 3) else torch.from_numpy(x).float() / 255.0
    else:
        X = torch.from_numpy(np.asarray(x, dtype=np.float32))
    if mean is not None:
        if std is None or len(mean) != X.shape[1] or len(std) != X.shape[1]:
            raise ValueError(f"mean and std need one value per channel ({X.shape[1]}); got {mean} and {std}.")
        if min(std) <= 0:
            raise ValueError(f"std must be positive; got {std}.")
        X = (X - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return X.contiguous(), y


def summarize(records):
    """Totals of a run: inputs, uploads, bytes sent and latency percentiles."""
    lat = np.array([r.latency_ms for r in records]) if records else np.zeros(1)
    return {
        "inputs": len(records),
        "failed": int(sum(r.status != "ok" for r in records)),
        "uploaded": int(sum(bool(r.uploaded) and r.status == "ok" for r in records)),
        "bytes_sent": int(sum(r.bytes_sent for r in records)),
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p95_ms": float(np.percentile(lat, 95)),
    }
