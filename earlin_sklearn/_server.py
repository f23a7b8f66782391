"""The cloud server: the exported cloud part of a split model over HTTP (FastAPI + uvicorn).

FastAPI gives request parsing, error responses and an OpenAPI page with
little code; uvicorn is its standard server. Both are well kept and pure
Python wheels (``pip install earlin_sklearn[serve]``).
"""

import base64
import importlib.util
import json
import logging
import os
import secrets
import tempfile
from typing import Any

import numpy as np

import torch

from ._allocator import IdleTrimmer
from ._batching import DynamicBatcher, QueueFull
from ._cloud_onnx import check_runtime, onnx_parts
from ._constants import COMPRESSIONS, HEADER_TIMEOUT_ENV, IMAGE_FORMATS
from ._drift import DriftMonitor, TooManyDevices
from ._export import load_split
from ._metrics import MULTIPROC_ENV, MetricsMiddleware, RequestLog, ServerMetrics
from ._openapi import add_security_scheme, get_route, post_route, report_route
from ._status import render_status
from .edge._wire import (DEVICE_ID, ENCODINGS, HEADER_BATCH, HEADER_COMPRESSION, HEADER_ENCODING, HEADER_VERSION,
                         MAX_REPORT_INPUTS, compressed_limit,
                         decode, decode_image, decompress, encoded_size)

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 2**20
MAX_REPORT_BYTES = 4096
LARGE_BODY = 1 << 20  # after requests this large, freed memory is handed back to the system once they stop


def create_cloud_app(split_dir: "str | os.PathLike[str]", token: "str | None" = None,
                     max_bytes: int = DEFAULT_MAX_BYTES, max_batch: int = 256, key: "bytes | str | None" = None,
                     docs: "bool | None" = None, body_timeout: float = 30.0, batch_inputs: int = 64,
                     max_wait_ms: float = 2.0, max_queue: int = 1024, drift_alpha: float = 1e-4,
                     runtime: str = "torch") -> Any:
    """The FastAPI application serving the cloud part in ``split_dir``.

    Parameters
    ----------
    split_dir : str or Path
        Directory written by :func:`save_split`.
    token : str, default=None
        Bearer token required from clients (``Authorization: Bearer TOKEN``,
        the scheme in any case) on every route but ``/livez``; None: no
        authentication. An empty token is refused.
    max_bytes : int, default=64 MiB
        Largest request body.
    max_batch : int, default=256
        Largest number of inputs in one request.
    key : bytes or str, default=None
        Serve only a split signed with this key (see :func:`save_split`).
    docs : bool, default=None
        Serve the OpenAPI pages (``/docs``, ``/openapi.json``). None: only
        when no ``token`` is set (the pages would otherwise bypass it).
    body_timeout : float, default=30
        Seconds a client may take to send its body (slow clients get 408).
    batch_inputs : int, default=64
        Dynamic batching: requests that arrive within ``max_wait_ms`` of one
        another run as one batch of the cloud part, of at most this many
        inputs (a larger request runs alone). Each request gets its own
        answer and its own errors (see ``earlin_sklearn/_batching.py``).
    max_wait_ms : float, default=2
        How long a request waits for batch-mates; 0 runs each request as it
        comes (inputs already queued still share a batch).
    max_queue : int, default=1024
        Inputs that may wait for a batch; beyond it, 503 with ``Retry-After``
        (the edge runner retries those).
    drift_alpha : float, default=1e-4
        False-alarm probability per report of each drift test on an ID
        stream (``POST /v1/report``, see ``earlin_sklearn/_drift.py``).
    runtime : {"torch", "onnxruntime"}, default="torch"
        What runs the parts: the split's ``.pt2`` programs in PyTorch, or its
        ``cloud.onnx`` (and float ``edge.onnx``, for raw inputs) in ONNX
        Runtime, which runs a batch without Python between operators and
        without the interpreter lock (``earlin_sklearn/_cloud_onnx.py``).
        Predictions are the same but for float32 rounding.

    Returns
    -------
    app : fastapi.FastAPI

    Notes
    -----
    Endpoints: ``GET /livez`` (``{"status": "ok"}`` and nothing else, without
    a token: a liveness probe); ``GET /health`` (status, model version and the
    payload it expects; the edge runner checks it before its first input);
    ``POST /v1/activations`` (body: the cut activations, see
    ``earlin_sklearn/edge/_wire.py``; runs the cloud part); ``POST /v1/raw``
    (body: input tensors, or one PNG/JPEG file with ``X-Earlin-Encoding:
    png|jpeg`` when the split records its preprocessing; runs the whole
    model, edge prefix then cloud part).
    ``POST /v1/report`` (an edge device's counts since its last report: JSON
    ``{"device", "seen", "accepted", "score_quantiles"}``; answers the drift
    alarms it raised); ``GET /metrics`` (Prometheus text format: requests by route and status,
    latencies, batch sizes, bytes received by encoding, cloud-stage
    verdicts, queue depth; the token applies); ``GET /status`` (a page for a
    person: the devices' acceptance over time, alarms, throughput and
    latency; the token applies, also as an HTTP Basic password).
    Both POST endpoints answer ``{"predictions": [...], "cloud_ms": ...,
    "batch_inputs": ...}`` (the compute time and size of the batch the
    request ran in).
    Malformed requests get a 4xx with a message and the server keeps
    serving: 400 (bad batch header, body that does not fit), 401 (token),
    409 (payload cut for another split version), 413 (body over
    ``max_bytes``), 415 (unknown encoding), 422 (the cloud part gave
    non-finite outputs for this payload), 428 (no ``X-Earlin-Version``);
    503 with ``Retry-After`` when ``max_queue`` inputs are waiting.
    The split is verified when the app is created (:func:`load_split`; the
    ONNX files against the same manifest).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> import tempfile
    >>> from earlin_sklearn import create_cloud_app, save_split
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_split(*det.export_split(), folder, X[:2], formats=("pt2",))
    >>> app = create_cloud_app(folder, token="s3cret")  # serve it with uvicorn.run(app) or earlin serve-cloud
    >>> sorted(r.path for r in app.routes)
    ['/health', '/livez', '/metrics', '/status', '/v1/activations', '/v1/raw', '/v1/report']
    """
    from ._optional import require

    if token is not None and not str(token):
        raise ValueError("the token is empty (is $EARLIN_TOKEN set?): pass a token, or none to serve without one.")

    if int(max_queue) < int(max_batch):
        raise ValueError(f"max_queue ({max_queue}) must be at least max_batch ({max_batch}): a request of max_batch "
                         "inputs could never be queued.")
    require("create_cloud_app", "serve", "fastapi", "prometheus_client")
    from fastapi import FastAPI, HTTPException, Request, Response
    from fastapi.responses import JSONResponse
    from fastapi.concurrency import run_in_threadpool

    import asyncio

    from starlette.requests import ClientDisconnect

    check_runtime(runtime)
    if runtime == "onnxruntime":
        require(f"create_cloud_app(runtime={runtime!r})", "export", "onnxruntime")
        manifest = load_split(split_dir, parts=(), key=key, as_split=True).manifest or {}
        edge, cloud = onnx_parts(split_dir, manifest, threads=torch.get_num_threads())
    else:
        edge, cloud = split = load_split(split_dir, key=key, as_split=True)
        manifest = split.manifest or {}  # (always set by load_split)
    version = manifest["version"]
    payload_shapes = [tuple(p["shape"]) for p in manifest["payload"]]
    input_shape = tuple(manifest["input_shape"])
    warm_up(edge, cloud, input_shape)
    # the largest body a valid request can have: never buffer more than that
    max_bytes = min(int(max_bytes), max(encoded_size(payload_shapes, max_batch, "float32"),
                                        encoded_size([input_shape], max_batch, "float32")))
    show_docs = token is None if docs is None else bool(docs)
    app = FastAPI(title="earlin cloud", version=version, docs_url="/docs" if show_docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if show_docs else None)

    def check_token(request, browser=False):
        """The bearer token; with ``browser``, also HTTP Basic with the token as the password (any user name),
        which a browser asks a person for (the 401 then names Basic)."""
        if token is None:
            return
        scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235); the token is compared in constant time
        sent = credentials.strip().encode()
        if browser and scheme.lower() == "basic":
            try:
                sent = base64.b64decode(sent, validate=True).partition(b":")[2]
            except ValueError:
                sent = b""
        elif scheme.lower() != "bearer":
            sent = b""
        if not (sent and secrets.compare_digest(sent, str(token).encode())):
            challenge = 'Basic realm="earlin", charset="UTF-8"' if browser else "Bearer"
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": challenge})

    def check_version(request, what="payload"):
        """The token, then the split version the body was made for: 428 without one, 409 for another."""
        check_token(request)
        sent_version = request.headers.get(HEADER_VERSION)
        if sent_version is None:
            raise HTTPException(428, f"{HEADER_VERSION} is required: the version of the split the {what} was made "
                                     f"for (this server runs {version})")
        if not secrets.compare_digest(sent_version.encode(), version.encode()):
            raise HTTPException(409, f"{what} is for model version {sent_version}; this server runs {version}")

    def check(request, images=False):
        check_version(request)
        encoding = request.headers.get(HEADER_ENCODING, "float32")
        allowed = ENCODINGS + (IMAGE_FORMATS if images else ())
        if encoding not in allowed:
            raise HTTPException(415, f"{HEADER_ENCODING} must be one of {list(allowed)}; got {encoding!r}")
        if encoding in IMAGE_FORMATS and manifest.get("preprocessing") is None:
            raise HTTPException(415, "this split records no preprocessing (save_split(..., preprocessing=...)), so "
                                     "the server cannot turn an image file into a model input; upload tensors")
        try:
            batch = int(request.headers.get(HEADER_BATCH, "1"))
        except ValueError:
            raise HTTPException(400, f"{HEADER_BATCH} must be an integer") from None
        if not 1 <= batch <= max_batch:
            raise HTTPException(400, f"{HEADER_BATCH} must be in [1, {max_batch}]; got {batch}")
        if encoding in IMAGE_FORMATS and batch != 1:
            raise HTTPException(400, f"an image file holds one input: {HEADER_BATCH} must be 1; got {batch}")
        compression = request.headers.get(HEADER_COMPRESSION, "none")
        if compression not in COMPRESSIONS:
            raise HTTPException(415, f"{HEADER_COMPRESSION} must be one of {list(COMPRESSIONS)}; got {compression!r}")
        if compression != "none" and encoding in IMAGE_FORMATS:
            raise HTTPException(415, f"{encoding} files are compressed already: send them with {HEADER_COMPRESSION}: none")
        if compression == "zstd" and importlib.util.find_spec("zstandard") is None:
            raise HTTPException(415, "this server cannot decompress zstd (pip install zstandard); send uncompressed bodies")
        return encoding, batch, compression

    async def read_body(request, expected):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise HTTPException(413, f"body of {length} bytes is over the limit of {max_bytes}")
        limit = min(max_bytes, expected)
        body, size = bytearray(), 0

        async def receive():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # stop reading at once: nothing beyond a valid body is buffered
                    raise HTTPException(413 if size > max_bytes else 400,
                                        f"body is over the {limit} bytes this request's headers allow")
                body.extend(chunk)

        try:
            if hasattr(asyncio, "timeout"):  # Python 3.11: a deadline on this task (wait_for starts another)
                async with asyncio.timeout(body_timeout):
                    await receive()
            else:
                await asyncio.wait_for(receive(), timeout=body_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the body took longer than {body_timeout} s to arrive") from None
        except ClientDisconnect:
            logger.info("client %s disconnected before sending its body", getattr(request.client, "host", "?"))
            raise HTTPException(400, "client disconnected") from None
        return bytes(body)

    def run_cloud(tensors):
        with torch.inference_mode():
            return cloud(*tensors)

    def run_whole(tensors):  # the whole model: the edge prefix (its detector's outputs are ignored), then the cloud
        with torch.inference_mode():
            return cloud(edge(tensors[0]).payload)

    metrics = ServerMetrics()
    trimmer = IdleTrimmer(delay=1.0)

    def observe_batch(n, seconds):
        metrics.batch_inputs.observe(n)
        metrics.compute_seconds.observe(seconds)

    batchers = {route: DynamicBatcher(run, batch_inputs, max_wait_ms, max_queue, on_batch=observe_batch)
                for route, run in (("activations", run_cloud), ("raw", run_whole))}

    async def predict(tensors, route):
        try:
            out, seconds, size = await batchers[route].submit(tensors)
        except QueueFull as exc:
            raise HTTPException(503, f"the server is busy ({exc}); retry shortly", headers={"Retry-After": "1"}) from None
        logits, verdict = (out[0], out[1:]) if isinstance(out, (tuple, list)) else (out, None)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise HTTPException(500, "the cloud part does not return (N, classes) logits")
        rows = logits.detach().numpy()  # a few rows: numpy's calls cost the event loop less than torch's
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():  # an overflowing payload: never answer a class computed from inf/NaN
            bad = np.flatnonzero(~finite).tolist()
            raise HTTPException(422, f"the cloud part gave non-finite outputs for inputs {bad[:10]} of this request")
        answer = {"predictions": rows.argmax(axis=1).tolist(), "cloud_ms": 1e3 * seconds, "batch_inputs": size}
        if verdict is not None:  # the cloud stage's detector (TwoStageDetector): its verdict and score per input
            answer["cloud_is_id"] = verdict[1].tolist()
            answer["cloud_score"] = verdict[0].tolist()
            for is_id in answer["cloud_is_id"]:
                metrics.cloud_verdicts.labels("id" if is_id else "ood").inc()
        return answer

    # an image file of the model's input size is at most about its raw pixels; allow headers and bad compression
    max_image_bytes = 2 * int(np.prod(input_shape)) + 65536

    async def handle(request, shapes, compute, images=False):
        encoding, batch, compression = check(request, images)
        is_image = encoding in IMAGE_FORMATS
        expected = max_image_bytes if is_image else encoded_size(shapes, batch, encoding)
        body = await read_body(request, expected if compression == "none" else compressed_limit(expected))
        metrics.received_bytes.labels(encoding).inc(len(body))
        try:
            return await respond(body, encoding, batch, compression, is_image, expected, shapes, compute)
        finally:
            if max(len(body), expected) >= LARGE_BODY:  # give the buffers' memory back once such requests stop
                trimmer.note(asyncio.get_running_loop())

    async def respond(body, encoding, batch, compression, is_image, expected, shapes, compute):
        try:
            if compression != "none":
                body = await run_in_threadpool(decompress, body, compression, expected)
            if is_image:
                arrays = [decode_image(body, encoding, input_shape, manifest["preprocessing"])]
            else:
                arrays = decode(body, shapes, batch, encoding)
            tensors = [torch.from_numpy(a) for a in arrays]
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        answer = await compute(tensors)
        return {**answer, "version": version}

    @app.get("/livez", **get_route("livez"))
    def livez():
        return {"status": "ok"}

    @app.get("/health", **get_route("health"))
    def health(request: Request):
        check_token(request)
        return {"status": "ok", "version": version, "input_shape": list(input_shape), "payload": manifest["payload"]}

    monitor = DriftMonitor(float(manifest.get("target_tpr") or 0.95), alpha=drift_alpha)

    @app.post("/v1/report", **report_route(version))
    async def report(request: Request):
        """An edge device's counts since its last report; drift alarms (a metric and a log line) when they leave the
        band the target TPR predicts (``earlin_sklearn/_drift.py``)."""
        check_version(request, "report")
        body = await read_body(request, MAX_REPORT_BYTES)
        try:
            report = json.loads(body)
            device, seen, accepted = report["device"], report["seen"], report["accepted"]
            quantiles = report.get("score_quantiles", [])
        except (ValueError, TypeError, KeyError):
            raise HTTPException(400, "a report is JSON with device (str), seen and accepted (integers)") from None
        if not (isinstance(device, str) and DEVICE_ID.fullmatch(device) and type(seen) is int
                and type(accepted) is int and 0 <= accepted <= seen <= MAX_REPORT_INPUTS
                and isinstance(quantiles, list) and len(quantiles) <= 16
                and all(isinstance(q, (int, float)) and not isinstance(q, bool) for q in quantiles)):
            raise HTTPException(400, "a report needs device (1-64 of [A-Za-z0-9._:@-]), 0 <= accepted <= seen <= "
                                     f"{MAX_REPORT_INPUTS} (integers) and at most 16 numeric score_quantiles")
        try:
            alarms = monitor.report(device, seen, accepted)
        except TooManyDevices as exc:
            raise HTTPException(429, str(exc)) from None
        metrics.reports.inc()
        metrics.report_inputs.labels("seen").inc(seen)
        metrics.report_inputs.labels("accepted").inc(accepted)
        metrics.devices.set(len(monitor.devices))
        metrics.fleet_acceptance.set(monitor.fleet_rate())
        for scope in alarms:
            metrics.drift_alarms.labels(scope).inc()
            logger.warning("drift alarm (%s): device %s accepted %d of %d inputs; the target TPR %.3f predicts "
                           "about %.0f", scope, device, accepted, seen, monitor.rate, monitor.rate * seen)
        return {"alarms": alarms, "target_tpr": monitor.rate, "fleet_acceptance": monitor.fleet_rate()}

    @app.get("/metrics", **get_route("metrics"))
    def metrics_page(request: Request):
        check_token(request)
        metrics.queue_depth.labels("activations").set(batchers["activations"].depth)
        metrics.queue_depth.labels("raw").set(batchers["raw"].depth)
        return Response(metrics.render(), media_type=metrics.content_type)

    request_log = RequestLog()

    @app.get("/status", **get_route("status"))
    def status_page(request: Request):
        """For a person: the edges' acceptance over time, alarms, throughput and latency (HTML, inline SVG)."""
        check_token(request, browser=True)
        page = render_status(version, monitor, request_log)
        return Response(page, media_type="text/html; charset=utf-8", headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'", "Cache-Control": "no-store"})

    # the hot routes answer a Response themselves (LeanRoute): documented like the others, no per-request
    # dependency solving or serialization by FastAPI
    lean = dict(methods=["POST"], route_class_override=lean_route())

    async def activations(request: Request):
        with batchers["activations"].expecting():
            return JSONResponse(await handle(request, payload_shapes, lambda t: predict(t, "activations")))

    async def raw(request: Request):
        with batchers["raw"].expecting():
            return JSONResponse(await handle(request, [input_shape], lambda t: predict(t, "raw"), images=True))

    app.router.add_api_route("/v1/activations", activations, **lean, **post_route(images=False, max_batch=max_batch,
                                                                           version=version))
    app.router.add_api_route("/v1/raw", raw, **lean, **post_route(images=True, max_batch=max_batch, version=version))

    app.state.metrics, app.state.batchers, app.state.trimmer, app.state.monitor = metrics, batchers, trimmer, monitor
    app.state.parts = (edge, cloud)  # what runs them: the PyTorch programs or the ONNX Runtime sessions
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes={getattr(route, "path") for route in app.routes},
                       log=request_log)
    add_security_scheme(app)
    return app


def lean_route():
    """FastAPI's route class for an endpoint ``async (request) -> Response``: FastAPI documents it (OpenAPI) and
    routes to it, its error handlers answer its ``HTTPException`` s, but per request it solves no dependencies,
    serializes nothing and opens no exit stacks: the endpoint runs in Starlette's own ``request_response`` (the
    server's hot routes; their bodies are bounded by ``read_body``)."""
    from fastapi.routing import APIRoute
    from starlette.routing import request_response

    class LeanRoute(APIRoute):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.app = request_response(self.endpoint)

    return LeanRoute


def warm_up(edge, cloud, input_shape):
    """Run one zero input through the loaded parts; refuse at start a split whose cloud output cannot be served."""
    with torch.inference_mode():
        out = cloud(edge(torch.zeros((2, *input_shape))).payload)
    if isinstance(out, (tuple, list)) and len(out) == 3:  # logits, then the cloud detector's score and verdict
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        kind = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {tuple(out.shape)}"
        raise ValueError(f"The cloud part returns {kind}; the server answers classes from (N, classes) logits. "
                         "Export a backbone whose forward() returns logits.")


def header_timeout_protocol(seconds, name=None):
    """uvicorn's HTTP protocol (httptools' where installed, else h11's; ``name``: a class of :mod:`._http`) with a
    deadline for request headers of ``seconds`` (:class:`_http.HeaderTimeout`)."""
    from ._http import protocol

    base = protocol(name)
    return type(base.__name__, (base,), {"seconds": float(seconds)})


APP_CONFIG_ENV = "EARLIN_SERVE_CONFIG"
"""The environment variable that hands ``create_cloud_app``'s arguments to uvicorn's worker processes."""


def app_from_environment():
    """The app of one worker process of ``serve(workers=N)``: ``create_cloud_app`` with the arguments in
    ``$EARLIN_SERVE_CONFIG`` (uvicorn's workers import an app factory by name; they get no arguments)."""
    config = json.loads(os.environ[APP_CONFIG_ENV])
    key = config.pop("key_b64")
    threads = config.pop("threads", None)
    if threads is not None:  # a spawned worker starts with torch's default (every core), not the parent's setting
        torch.set_num_threads(int(threads))
    return create_cloud_app(**config, key=None if key is None else base64.b64decode(key))


def serve(split_dir, host="127.0.0.1", port=8000, token=None, max_bytes=DEFAULT_MAX_BYTES, log_level="info", key=None,
          ssl_certfile=None, ssl_keyfile=None, timeout_keep_alive=5, header_timeout=10.0, batch_inputs=64,
          max_wait_ms=2.0, max_queue=1024, workers=1, graceful_seconds=30.0, runtime="torch", access_log=True):
    """Run the cloud server until interrupted (``earlin serve-cloud``); TLS when given a certificate and key.

    ``workers > 1``: uvicorn's own process model, that many worker processes
    on one listening socket, each with the split loaded, its own batcher and
    drift monitor; ``/metrics`` then sums the workers' counts
    (prometheus-client's multiprocess mode, in ``$PROMETHEUS_MULTIPROC_DIR``,
    a fresh temporary folder unless set). On SIGINT or SIGTERM, requests in
    flight are finished (for at most ``graceful_seconds``) before a worker exits.
    ``runtime``: see :func:`create_cloud_app`; ``access_log=False``: no log
    line per request (``/metrics`` counts them).
    """
    from ._optional import require

    (uvicorn,) = require("serve", "serve", "uvicorn")

    options = dict(host=host, port=port, log_level=log_level, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                   timeout_keep_alive=timeout_keep_alive, timeout_graceful_shutdown=graceful_seconds,
                   access_log=bool(access_log))
    config = dict(split_dir=str(split_dir), token=token, max_bytes=max_bytes, batch_inputs=batch_inputs,
                  max_wait_ms=max_wait_ms, max_queue=max_queue, runtime=runtime)
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1; got {workers}.")
    if int(workers) == 1:
        app = create_cloud_app(**config, key=key)
        uvicorn.run(app, **options, http=header_timeout_protocol(header_timeout))
        return
    # a bad split, key or runtime fails here, once, not in every worker
    check_runtime(runtime, load_split(split_dir, parts=(), key=key, as_split=True).manifest, split_dir)
    if isinstance(key, str):
        key = key.encode()
    os.environ[APP_CONFIG_ENV] = json.dumps({**config, "key_b64": None if key is None else
                                             base64.b64encode(key).decode(), "threads": torch.get_num_threads()})
    os.environ[HEADER_TIMEOUT_ENV] = str(float(header_timeout))
    if not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="earlin_metrics_")
    from ._http import DEFAULT

    uvicorn.run("earlin_sklearn._server:app_from_environment", factory=True, workers=int(workers), **options,
                http=f"earlin_sklearn._http:{DEFAULT}")
