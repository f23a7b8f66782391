"""The cloud server's OpenAPI description: every route's headers, request body and responses.

The routes read their raw bodies and headers themselves (to bound reads and
answer each mistake with its own status), so FastAPI cannot infer any of it;
it is declared here, for client generators, schema fuzzers and people. The
bearer token is a security scheme, as OpenAPI 3 wants for ``Authorization``.
"""

from ._constants import COMPRESSIONS, ENCODINGS, IMAGE_FORMATS
from .edge._wire import DEVICE_ID, HEADER_BATCH, HEADER_COMPRESSION, HEADER_ENCODING, HEADER_VERSION, MAX_REPORT_INPUTS

_ERROR = {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}},
                                          "required": ["detail"]}}}
_STATUS = {
    400: "a body that does not fit the headers (shape, batch, encoding, truncated, NaN/inf, a damaged image)",
    401: "missing or wrong bearer token",
    408: "the body took longer than the server's body timeout",
    409: "payload cut for another split version",
    413: "body over the server's limit",
    415: "unknown encoding or compression, or an image for a split without preprocessing",
    422: "finite values that overflow inside the cloud part (never a class computed from inf/NaN)",
    428: f"no {HEADER_VERSION} header",
    500: "the cloud part does not return (N, classes) logits",
    503: "too many inputs waiting for a batch; retry after the Retry-After header's seconds",
}
_ANSWER = {"application/json": {"schema": {
    "type": "object",
    "properties": {
        "predictions": {"type": "array", "items": {"type": "integer"}, "description": "class per input"},
        "cloud_ms": {"type": "number", "description": "compute time of the batch the request ran in"},
        "batch_inputs": {"type": "integer", "description": "inputs in that batch"},
        "version": {"type": "string", "description": "the split version that answered"},
        "cloud_is_id": {"type": "array", "items": {"type": "boolean"},
                        "description": "the cloud-stage detector's verdict (two-stage splits only)"},
        "cloud_score": {"type": "array", "items": {"type": "number"},
                        "description": "the cloud-stage detector's score (two-stage splits only)"},
    },
    "required": ["predictions", "cloud_ms", "batch_inputs", "version"],
}}}


def _header(name, description, schema, required=False):
    return {"name": name, "in": "header", "required": required, "description": description, "schema": schema}


def post_route(images, max_batch, version):
    """``openapi_extra`` and ``responses`` of ``POST /v1/activations`` (``images=False``) or ``/v1/raw``, on a server
    of split ``version``."""
    encodings = list(ENCODINGS) + (list(IMAGE_FORMATS) if images else [])
    body = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                         "description": "raw little-endian tensors (earlin_sklearn/edge/_wire.py), "
                                                        "optionally Zstandard-compressed"}}
    if images:
        body.update({f"image/{f}": {"schema": {"type": "string", "format": "binary"},
                                    "description": f"one {f.upper()} file (X-Earlin-Encoding: {f})"}
                     for f in IMAGE_FORMATS})
    parameters = [
        _header(HEADER_VERSION, "the version of the split the body was made for (GET /health); this server "
                "answers only its own", {"type": "string", "enum": [version]}, required=True),
        _header(HEADER_BATCH, "inputs in the body", {"type": "integer", "minimum": 1, "maximum": max_batch,
                                                     "default": 1}),
        _header(HEADER_ENCODING, "how the tensors are encoded", {"type": "string", "enum": encodings,
                                                                 "default": "float32"}),
        _header(HEADER_COMPRESSION, "body compression", {"type": "string", "enum": list(COMPRESSIONS),
                                                         "default": "none"}),
    ]
    extra = {"parameters": parameters, "requestBody": {"required": True, "content": body},
             "security": [{"bearer": []}, {}]}
    responses = {200: {"description": "a class per input", "content": _ANSWER}}
    responses.update({code: {"description": text, "content": _ERROR} for code, text in _STATUS.items()})
    return {"openapi_extra": extra, "responses": responses}


def get_route(kind):
    """``openapi_extra`` and ``responses`` of ``GET /health``, ``/metrics``, ``/status`` or ``/livez``."""
    if kind == "livez":
        return {"responses": {200: {"description": "the server is up (nothing else is said)", "content": {
            "application/json": {"schema": {"type": "object", "properties": {"status": {"const": "ok"}}}}}}}}
    if kind == "metrics":
        ok = {"description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {
            "type": "string"}}}}
    elif kind == "status":
        ok = {"description": "the status page, for a person (HTML with inline SVG plots)", "content": {
            "text/html": {"schema": {"type": "string"}}}}
    else:
        ok = {"description": "status, split version, input shape and payload", "content": {"application/json": {
            "schema": {"type": "object", "properties": {
                "status": {"const": "ok"}, "version": {"type": "string"},
                "input_shape": {"type": "array", "items": {"type": "integer"}},
                "payload": {"type": "array", "items": {"type": "object"}}}}}}}
    return {"openapi_extra": {"security": [{"bearer": []}, {}]},
            "responses": {200: ok, 401: {"description": _STATUS[401], "content": _ERROR}}}


def add_security_scheme(app):
    """Declare the bearer token once, in ``components.securitySchemes`` (routes name it in ``security``)."""
    original = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = original()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "the server's token, when it has one (earlin serve-cloud --token)"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def report_route(version):
    """``openapi_extra`` and ``responses`` of ``POST /v1/report`` (an edge device's counts)."""
    body = {"application/json": {"schema": {
        "type": "object", "required": ["device", "seen", "accepted"],
        "properties": {"device": {"type": "string", "pattern": f"^{DEVICE_ID.pattern}$"},
                       "seen": {"type": "integer", "minimum": 0, "maximum": MAX_REPORT_INPUTS},
                       "accepted": {"type": "integer", "minimum": 0, "maximum": MAX_REPORT_INPUTS,
                                    "description": "at most seen"},
                       "score_quantiles": {"type": "array", "maxItems": 16, "items": {"type": "number"}}}}}}
    answer = {"application/json": {"schema": {"type": "object", "properties": {
        "alarms": {"type": "array", "items": {"enum": ["report", "device", "fleet"]}},
        "target_tpr": {"type": "number"}, "fleet_acceptance": {"type": "number"}}}}}
    extra = {"parameters": [_header(HEADER_VERSION, "the version of the split the device runs", {
        "type": "string", "enum": [version]}, required=True)],
        "requestBody": {"required": True, "content": body}, "security": [{"bearer": []}, {}]}
    responses = {200: {"description": "the drift alarms this report raised", "content": answer}}
    responses.update({code: {"description": _STATUS[code] if code != 429 else "too many devices reporting",
                             "content": _ERROR} for code in (400, 401, 408, 409, 413, 428, 429)})
    return {"openapi_extra": extra, "responses": responses}
