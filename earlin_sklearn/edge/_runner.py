"""The edge runner: decide ID/OOD on the device, upload only ID inputs to the cloud server.

NumPy, the edge program's runtime and httpx: no PyTorch, no scikit-learn.
"""

import itertools
import json
import logging
import os
import re
import socket
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any
from pathlib import Path

import numpy as np

from .._constants import COMPRESSIONS, IMAGE_FORMATS, UPLOADS
from ..exceptions import EarlinWarning
from ._programs import load_edge_program
from ._wire import (DEVICE_ID, ENCODINGS, HEADER_BATCH, HEADER_COMPRESSION, HEADER_ENCODING, HEADER_VERSION, as_float32, compress,
                    encode, encode_image, encoded_size, preprocess, transfer_seconds)

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
    uploaded: str  # "activations", "raw" or "" (rejected as OOD, or not run: nothing sent)
    bytes_sent: int
    latency_ms: float
    prediction: int  # the cloud's prediction, -1 when nothing was sent
    label: int = -1
    # "ok"; "failed" (the upload failed after every retry); "refused" (the server refused the runner itself:
    # token, split version); "not run" (an earlier input ended the run). `error` says why.
    status: str = "ok"
    error: str = ""
    attempts: int = 0  # HTTP requests made for this input
    cloud_is_id: object = None  # the cloud stage's verdict (TwoStageDetector splits); None without one


class CloudRefused(RuntimeError):
    """The server refused the runner itself (token, split version): no later upload can succeed.

    ``record`` is the :class:`EdgeRecord` of the input whose upload was refused.
    """

    record: Any = None


class CloudUnreachable(ConnectionError):
    """The cloud server did not answer the runner's health check (down, wrong URL, network)."""


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
        Directory written by :func:`~earlin_sklearn.save_split` (the same files as the server's).
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
        Bearer token of the server (an empty one is refused).
    uplink_mbit_s, cloud_gflop_s : float
        For ``upload="auto"``.
    timeout : float, default=30
        Seconds per request.
    key : bytes or str, default=None
        Run only a split signed with this key (see :func:`~earlin_sklearn.save_split`).
    retries : int, default=5
        Further attempts after a timeout, a dropped connection or a 408/429/5xx
        answer, with exponential backoff (``backoff * 2**attempt`` seconds, at
        most 30). An input whose upload still fails is recorded with
        ``status="failed"`` and the run goes on; a rerun with ``resume=True``
        retries only those.
    backoff : float, default=0.5
    runtime : {"auto", "onnxruntime", "executorch", "torch"}, default="auto"
        Which of the split's edge files runs the edge part: ``"auto"`` takes
        ExecuTorch (``.pte``), then ONNX Runtime, then PyTorch (``.pt2``),
        the first that the split has and this environment can run. Only
        ``"torch"`` imports PyTorch.
    precision : {"auto", "float32", "int8"}, default="auto"
        ``"auto"``: the split's int8 program for that runtime when it has one.
    threads : int, default=1
        Intra-op threads of the edge runtime.
    mean, std : sequence of float, default=None
        How uint8 images become model inputs (after /255) when the split
        records no preprocessing; a split's recorded preprocessing wins.
    report_every : int, default=100
        During :meth:`run`, send the server a report every this many inputs
        (and at the end): the device id, how many inputs it saw and accepted,
        and quantiles of their scores (``POST /v1/report``; never the inputs
        themselves). The server raises drift alarms from them. 0: no reports.
        A report that fails is logged and dropped; it never stops the run.
    device : str, default=None
        The id the reports carry (1-64 of ``[A-Za-z0-9._:@-]``); None: this
        machine's host name.

    Examples
    --------
    >>> import tempfile, numpy as np, torch
    >>> from earlin_sklearn import EdgeRunner, ShallowFeatureOODDetector, save_split
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_split(*det.export_split(), folder, X[:2], formats=("pt2", "onnx"))
    >>> runner = EdgeRunner(folder, "http://127.0.0.1:8000", upload="auto")  # nothing is sent yet
    >>> runner.program.name, runner.program.runtime  # ONNX Runtime: no PyTorch needed
    ('edge.onnx', 'onnxruntime')
    >>> runner.upload  # the cost model's choice: a ResNet-20 layer1 payload is 21x the input
    'raw'
    >>> runner.close()

    With ``earlin serve-cloud FOLDER`` running at that address,
    ``runner.run(images, log="edge_log.jsonl")`` decides on each input and
    uploads the accepted ones.
    """

    def __init__(self, split_dir: "str | os.PathLike[str]", url: str, upload: str = "auto",
                 encoding: str = "float32", token: "str | None" = None, uplink_mbit_s: float = 10.0,
                 cloud_gflop_s: float = 1000.0, timeout: float = 30.0, key: "bytes | str | None" = None,
                 retries: int = 5, backoff: float = 0.5, jpeg_quality: int = 90, compression: str = "none",
                 runtime: str = "auto", precision: str = "auto", threads: int = 1,
                 mean: "Sequence[float] | None" = None, std: "Sequence[float] | None" = None,
                 report_every: int = 100, device: "str | None" = None) -> None:
        from .._optional import require

        (httpx,) = require("EdgeRunner", "edge", "httpx")

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
        if (mean is None) != (std is None):
            raise ValueError("mean and std go together.")
        if token is not None and not str(token):
            raise ValueError("the token is empty (is $EARLIN_TOKEN set?): pass the server's token, or none.")
        self.compression = compression
        self._choose = dict(encoding=encoding, uplink_mbit_s=uplink_mbit_s, cloud_gflop_s=cloud_gflop_s)
        self.jpeg_quality = int(jpeg_quality)
        if int(retries) < 0 or backoff < 0 or timeout <= 0:
            raise ValueError("retries and backoff must be >= 0 and timeout > 0.")
        self.retries, self.backoff = int(retries), float(backoff)
        self.manifest, self.program = load_edge_program(split_dir, runtime, precision, key=key, threads=threads)
        self.preprocessing = self.manifest.get("preprocessing") or (
            {"mean": list(mean), "std": list(std)} if mean is not None and std is not None else None)
        if self.preprocessing is not None:
            channels = self.manifest["input_shape"][0]
            for name in ("mean", "std"):
                values = self.preprocessing.get(name, [])
                if len(values) != channels or (name == "std" and min(values) <= 0):
                    raise ValueError(f"preprocessing {name} needs {channels} values (std > 0); got {values}.")
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
        if int(report_every) < 0:
            raise ValueError("report_every must be >= 0 (0: no reports).")
        self.report_every = int(report_every)
        self.device = device if device is not None else re.sub(r"[^A-Za-z0-9._:@-]", "-", socket.gethostname())[:64]
        if not DEVICE_ID.fullmatch(self.device):
            raise ValueError(f"device must be 1-64 of [A-Za-z0-9._:@-]; got {self.device!r}.")
        self.reports: list = []  # the server's answers to this runner's reports

    def send_report(self, records):
        """Report ``records`` (this device's inputs since its last report) to the server; its answer, or None.

        The body holds counts and score quantiles only. A failure is logged
        and dropped: reports are telemetry, never a reason to stop.
        """
        scores = np.array([r.score for r in records], dtype=np.float64)
        scores = scores[np.isfinite(scores)]
        body = {"device": self.device, "seen": len(records), "accepted": int(sum(bool(r.is_id) for r in records)),
                "score_quantiles": np.quantile(scores, [0.05, 0.5, 0.95]).tolist() if scores.size else []}
        try:
            r = self.client.post("/v1/report", content=json.dumps(body), headers={"Content-Type": "application/json"})
            r.raise_for_status()
            answer = r.json()
        except Exception as exc:  # httpx errors, a non-JSON answer: telemetry is best effort
            logger.warning("report of %d inputs not delivered: %s", len(records), exc)
            return None
        if answer.get("alarms"):
            logger.warning("the server raised drift alarms %s on this device's report (%d of %d inputs accepted)",
                           answer["alarms"], body["accepted"], body["seen"])
        self.reports.append(answer)
        return answer

    def close(self):
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_server(self, wait=0.0, timeout=5.0):
        """Ask the server's ``/health`` once before the first input: reachable, token accepted, same split.

        Parameters
        ----------
        wait : float, default=0
            Seconds to keep asking while the server cannot be reached (one
            that starts beside the device); a refusal ends the wait at once.
        timeout : float, default=5
            Seconds per attempt.

        Returns
        -------
        health : dict
            The server's answer (status, version, input and payload shapes).

        Raises
        ------
        CloudUnreachable
            No answer within ``wait`` (and ``timeout``): the reason, in one line.
        CloudRefused
            The server refused the token, or serves another split.
        """
        import httpx

        deadline = time.monotonic() + float(wait)
        url = str(self.client.base_url).rstrip("/")
        while True:
            try:
                response = self.client.get("/health", timeout=timeout)
                break
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = f"{type(exc).__name__}: {exc or 'no reason given'}"
                    raise CloudUnreachable(f"the cloud server at {url} does not answer ({reason}): is earlin "
                                           "serve-cloud running there?") from None
                time.sleep(min(0.5, left))
        if response.status_code in (401, 403):
            raise CloudRefused(f"the cloud server at {url} refused the token (HTTP {response.status_code}): pass the "
                               "token it was started with (--token or --token-file).")
        try:
            health = response.json() if response.status_code == 200 else None
        except ValueError:
            health = None
        if not isinstance(health, dict) or "version" not in health:
            raise CloudRefused(f"{url}/health answered HTTP {response.status_code} without an earlin health report: "
                               f"{response.text[:200]!r}; is this earlin serve-cloud?")
        if health["version"] != self.manifest["version"]:
            raise CloudRefused(f"the cloud server at {url} serves split version {health['version']}, this split is "
                               f"{self.manifest['version']}: deploy the same save_split folder on both sides.")
        return health

    def model_input(self, x, index=0):
        """``(model input (C, H, W) float32, camera image or None)`` for one input.

        A uint8 image ``(H, W, C)`` (or ``(H, W)``) is normalized with the
        split's preprocessing (or the runner's ``mean``/``std``); one that
        has neither is refused, never run unnormalized. Anything else is
        taken as a model input.
        """
        a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)  # a tensor keeps its dtype
        if a.dtype == np.uint8:
            if self.preprocessing is None:
                raise ValueError(f"input {index} is a uint8 image, and the split records no preprocessing: save it "
                                 "with save_split(..., preprocessing={'mean': [...], 'std': [...]}) or pass mean and "
                                 "std (earlin run-edge --mean ... --std ...). Unnormalized pixels would be judged OOD.")
            if a.ndim == 4 and a.shape[0] == 1:
                a = a[0]
            return preprocess(a, self.manifest["input_shape"], self.preprocessing), a
        if self.encoding in IMAGE_FORMATS:
            raise ValueError(f"input {index}: encoding={self.encoding!r} uploads camera images: pass uint8 "
                             f"(H, W, C) pixels; got {a.dtype}.")
        a = as_float32(a)
        if a.ndim == 4 and a.shape[0] == 1:
            a = a[0]
        return a, None

    def process(self, x: np.ndarray, index: int = 0, label: int = -1) -> "EdgeRecord":
        """Decide on one input and upload it if it is ID (with retries).

        ``x`` is a model input ``(C, H, W)``, or a uint8 camera image
        ``(H, W, C)`` that the split's preprocessing turns into one.
        """
        t0 = time.perf_counter()
        x, image = self.model_input(x, index)
        expected = tuple(self.manifest["input_shape"])
        if tuple(x.shape) != expected:
            raise ValueError(f"input {index} has shape {tuple(x.shape)}; the split expects {expected} (C, H, W).")
        x = x[None]
        is_id, score, payload = self.program(x)
        accepted = bool(is_id[0])
        record = EdgeRecord(index, accepted, float(score[0]), "", 0, 0.0, -1, int(label))
        if accepted:
            if self.encoding in IMAGE_FORMATS:
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
            try:
                self._upload(record, body)
            except CloudRefused as exc:
                record.latency_ms = 1e3 * (time.perf_counter() - t0)
                exc.record = record
                raise
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
                    record.status, record.error = "refused", f"HTTP {response.status_code}: {detail}"
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

    def run(self, inputs: Iterable[np.ndarray], labels: "Iterable[int] | None" = None,
            log: "str | os.PathLike[str] | None" = None, resume: bool = False) -> "list[EdgeRecord]":
        """Process a stream of inputs, writing one JSON line per input to ``log`` as it goes.

        Every input gets exactly one line, whatever ends the run: when the
        server refuses the runner itself (:class:`~earlin_sklearn.edge.CloudRefused`: token, split
        version), the input in flight is recorded as ``"refused"`` and every
        later one as ``"not run"`` before the error propagates.

        Parameters
        ----------
        inputs : iterable of arrays (C, H, W) or uint8 images (H, W, C), or an array (N, ...)
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
        pairs: Any = ((x, -1) for x in inputs) if labels is None else itertools.zip_longest(inputs, labels,
                                                                                           fillvalue=missing)
        pairs = enumerate(pairs)
        records = []
        out = None
        if log is not None:
            tmp = Path(f"{log}.tmp")
            with open(tmp, "w") as f:  # the kept records first, then the new ones are appended
                for r in sorted(done.values(), key=lambda r: r.index):
                    f.write(json.dumps(asdict(r)) + "\n")
            os.replace(tmp, log)
            out = open(log, "a")

        window = []  # inputs processed since the last report

        def keep(record):
            records.append(record)
            if out is not None:
                out.write(json.dumps(asdict(record)) + "\n")
                out.flush()
            if self.report_every and record.status != "not run":
                window.append(record)
                if len(window) >= self.report_every:
                    self.send_report(window)
                    window.clear()

        try:
            for i, (x, label) in pairs:
                if x is missing or label is missing:
                    raise ValueError(f"inputs and labels differ in length: one of them ended at item {i}.")
                if i in done:
                    records.append(done[i])
                    continue
                label = -1 if labels is None else int(label)
                try:
                    record = self.process(x, i, label)
                except CloudRefused as exc:
                    keep(exc.record)
                    for j, (_, later) in pairs:  # the rest of the stream: never run, each said so
                        if j not in done:
                            keep(EdgeRecord(j, False, float("nan"), "", 0, 0.0, -1,
                                            -1 if labels is None or later is missing else int(later), "not run",
                                            f"input {i} ended the run: {exc}"))
                    raise
                keep(record)
            if window:
                self.send_report(window)
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


def read_inputs(source):
    """Inputs for the edge runner from an ``.npz`` file or a directory of images.

    An npz holds ``x`` (uint8 images ``(N, H, W, C)``, or float model inputs
    ``(N, C, H, W)``) and optionally ``y``; image files (PNG, JPEG, ...) are
    read with Pillow as uint8 RGB. uint8 images stay uint8: the runner
    normalizes them with the split's preprocessing.

    Returns
    -------
    X : ndarray (N, H, W, C) uint8 or (N, C, H, W) float32
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
        if not source.exists():
            raise FileNotFoundError(f"{source} not found: pass an .npz file with an array 'x' or a folder of images.")
        try:
            data = np.load(source, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{source} is not an .npz file numpy can read: {exc}") from None
        if not hasattr(data, "files") or "x" not in data.files:
            have = ", ".join(data.files) if hasattr(data, "files") else "a single array"
            raise ValueError(f"{source} has no array 'x' (it holds {have}): save the inputs with np.savez(path, x=...)")
        x = data["x"]
        y = data["y"] if "y" in data.files else None
    if y is not None and len(y) != len(x):
        raise ValueError(f"{source}: y has {len(y)} labels for {len(x)} images.")
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f"{source}: uint8 images are (N, H, W, C); got shape {x.shape}.")
        return x, y
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{source}: x is {x.dtype}: pass uint8 images (N, H, W, C) or float inputs (N, C, H, W).")
    return np.ascontiguousarray(x, dtype=np.float32), y


def summarize(records):
    """Totals of a run: inputs, uploads, bytes sent and latency percentiles."""
    lat = np.array([r.latency_ms for r in records]) if records else np.zeros(1)
    return {
        "inputs": len(records),
        "failed": int(sum(r.status == "failed" for r in records)),
        "not_run": int(sum(r.status in ("refused", "not run") for r in records)),
        "uploaded": int(sum(bool(r.uploaded) and r.status == "ok" for r in records)),
        "rejected": int(sum(not r.is_id and r.status == "ok" for r in records)),
        "bytes_sent": int(sum(r.bytes_sent for r in records)),
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p95_ms": float(np.percentile(lat, 95)),
    }
