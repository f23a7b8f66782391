"""The cloud server: the exported cloud part of a split model over HTTP (FastAPI + uvicorn).

FastAPI gives request parsing, error responses and an OpenAPI page with
little code; uvicorn is its standard server. Both are well kept and pure
Python wheels (``pip install earlin_sklearn[serve]``).
"""

import logging
import secrets
import time

import torch

from ._export import load_split
from ._protocol import ENCODINGS, HEADER_BATCH, HEADER_ENCODING, HEADER_VERSION, decode

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 2**20


def create_cloud_app(split_dir, token=None, max_bytes=DEFAULT_MAX_BYTES, max_batch=256, key=None):
    """The FastAPI application serving the cloud part in ``split_dir``.

    Parameters
    ----------
    split_dir : str or Path
        Directory written by :func:`save_split`.
    token : str, default=None
        Bearer token required from clients; None: no authentication.
    max_bytes : int, default=64 MiB
        Largest request body.
    max_batch : int, default=256
        Largest number of inputs in one request.
    key : bytes or str, default=None
        Serve only a split signed with this key (see :func:`save_split`).

    Returns
    -------
    app : fastapi.FastAPI

    Notes
    -----
    Endpoints: ``GET /health`` (status, model version and the payload it
    expects); ``POST /v1/activations`` (body: the cut activations, see
    ``earlin_sklearn/_protocol.py``; runs the cloud part); ``POST /v1/raw``
    (body: input images; runs the whole model, edge prefix then cloud part).
    Both POST endpoints answer ``{"predictions": [...], "cloud_ms": ...}``.
    Malformed requests get a 4xx with a message and the server keeps
    serving: 400 (bad batch header, body that does not fit), 401 (token),
    409 (payload cut for another split version), 413 (body over
    ``max_bytes``), 415 (unknown encoding), 422 (the cloud part gave
    non-finite outputs for this payload), 428 (no ``X-Earlin-Version``).
    The split is verified when the app is created (:func:`load_split`).
    """
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool

    manifest, edge, cloud = load_split(split_dir, key=key)
    version = manifest["version"]
    payload_shapes = [tuple(p["shape"]) for p in manifest["payload"]]
    input_shape = tuple(manifest["input_shape"])
    app = FastAPI(title="earlin cloud", version=version)

    def check(request, body_len=None):
        if token is not None:
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got.encode(), f"Bearer {token}".encode()):
                raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        sent_version = request.headers.get(HEADER_VERSION)
        if sent_version is None:
            raise HTTPException(428, f"{HEADER_VERSION} is required: the version of the split the payload was made "
                                     f"for (this server runs {version})")
        if not secrets.compare_digest(sent_version.encode(), version.encode()):
            raise HTTPException(409, f"payload is for model version {sent_version}; this server runs {version}")
        encoding = request.headers.get(HEADER_ENCODING, "float32")
        if encoding not in ENCODINGS:
            raise HTTPException(415, f"{HEADER_ENCODING} must be one of {list(ENCODINGS)}; got {encoding!r}")
        try:
            batch = int(request.headers.get(HEADER_BATCH, "1"))
        except ValueError:
            raise HTTPException(400, f"{HEADER_BATCH} must be an integer") from None
        if not 1 <= batch <= max_batch:
            raise HTTPException(400, f"{HEADER_BATCH} must be in [1, {max_batch}]; got {batch}")
        return encoding, batch

    async def read_body(request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise HTTPException(413, f"body of {length} bytes is over the limit of {max_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise HTTPException(413, f"body is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def predict(tensors, raw):
        t0 = time.perf_counter()
        with torch.inference_mode():
            if raw:  # the whole model: the edge prefix (the detector's outputs are ignored), then the cloud part
                _, _, *tensors = edge(tensors[0])
            logits = cloud(*tensors)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise HTTPException(500, "the cloud part does not return (N, classes) logits")
        bad = (~torch.isfinite(logits).all(dim=1)).nonzero().flatten().tolist()
        if bad:  # an overflowing payload: never answer a class computed from inf/NaN
            raise HTTPException(422, f"the cloud part gave non-finite outputs for inputs {bad[:10]} of this request")
        return logits.argmax(dim=1).tolist(), 1e3 * (time.perf_counter() - t0)

    async def handle(request, shapes, compute):
        encoding, batch = check(request)
        body = await read_body(request)
        try:
            tensors = decode(body, shapes, batch, encoding)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        predictions, ms = await run_in_threadpool(compute, tensors)
        return {"predictions": predictions, "cloud_ms": ms, "version": version}

    @app.get("/health")
    def health():
        return {"status": "ok", "version": version, "input_shape": list(input_shape), "payload": manifest["payload"]}

    @app.post("/v1/activations")
    async def activations(request: Request):
        return await handle(request, payload_shapes, lambda t: predict(t, raw=False))

    @app.post("/v1/raw")
    async def raw(request: Request):
        return await handle(request, [input_shape], lambda t: predict(t, raw=True))

    return app


def serve(split_dir, host="127.0.0.1", port=8000, token=None, max_bytes=DEFAULT_MAX_BYTES, log_level="info", key=None):
    """Run the cloud server until interrupted (``earlin serve-cloud``)."""
    import uvicorn

    app = create_cloud_app(split_dir, token=token, max_bytes=max_bytes, key=key)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
