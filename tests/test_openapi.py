"""The cloud server's OpenAPI schema describes every route's headers, bodies and responses, and the server keeps
to it: schemathesis, a schema fuzzer, generates requests from the schema (valid and invalid) and checks every
answer against it (declared status, content type and body schema; no 5xx)."""

import collections
import json

import numpy as np
import pytest
import torch

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi import checks  # noqa: E402

from earlin_sklearn import ShallowFeatureOODDetector, save_split  # noqa: E402
from earlin_sklearn._server import create_cloud_app  # noqa: E402

from .conftest import make_images, make_tiny_cnn  # noqa: E402

TOKEN = "schema-token"
# a body's valid size follows from its headers (batch x shapes x encoding), which a schema cannot say: a
# schema-valid body of random bytes is rightly refused with 400
EXCLUDED = [checks.positive_data_acceptance]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    X, y = make_images(60)
    directory = tmp_path_factory.mktemp("split")
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y)
    save_split(*det.export_split(), directory, torch.from_numpy(X[:4]), formats=("pt2",),
               preprocessing={"mean": [0.5] * 3, "std": [0.25] * 3})
    return create_cloud_app(directory, token=TOKEN, docs=True)


def test_the_schema_describes_headers_bodies_and_responses(app):
    from fastapi.testclient import TestClient

    spec = TestClient(app).get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path in ("/v1/activations", "/v1/raw"):
        post = spec["paths"][path]["post"]
        headers = {p["name"] for p in post["parameters"] if p["in"] == "header"}
        assert headers == {"X-Earlin-Version", "X-Earlin-Batch", "X-Earlin-Encoding", "X-Earlin-Compression"}
        assert "application/octet-stream" in post["requestBody"]["content"]
        assert {"200", "400", "401", "409", "413", "415", "422", "428", "503"} <= set(post["responses"])
        assert post["responses"]["200"]["content"]["application/json"]["schema"]["required"]
    assert {"image/png", "image/jpeg"} <= set(spec["paths"]["/v1/raw"]["post"]["requestBody"]["content"])
    for path in ("/health", "/metrics", "/livez"):
        assert "200" in spec["paths"][path]["get"]["responses"]
    json.dumps(spec)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_a_schema_fuzz_finds_no_answer_outside_the_schema(app, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen = collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # a GET without parameters has no invalid request to generate

        @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            for auth in ({"Authorization": f"Bearer {TOKEN}"}, {}):
                response = case.call(headers=auth)
                seen[(operation.path, response.status_code)] += 1
                case.validate_response(response, excluded_checks=EXCLUDED, headers=auth)

        fuzz()
    assert not [k for k in seen if k[1] >= 500], seen
    if mode == GenerationMode.POSITIVE:
        assert seen[("/livez", 200)] and seen[("/health", 401)] and seen[("/health", 200)]
    assert seen[("/v1/activations", 401)] and seen[("/v1/raw", 401)], seen  # the requests without the token
    assert np.sum(list(seen.values())) > 100, seen
