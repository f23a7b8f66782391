"""The server at start and against slow or odd clients: warm-up, docs behind the token, slow bodies."""

import importlib.util
import socket
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from earlin_sklearn import ShallowFeatureOODDetector, save_split  # noqa: E402
from earlin_sklearn._server import create_cloud_app  # noqa: E402

from .conftest import make_images, make_tiny_cnn, start_uvicorn, stop_uvicorn, uvicorn_running  # noqa: E402


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    X, y = make_images(90)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y)
    directory = tmp_path_factory.mktemp("split")
    save_split(*det.export_split(), directory, torch.from_numpy(X[:4]), formats=("pt2",))
    return directory


def test_openapi_pages_need_no_token_only_when_there_is_none(split_dir):
    for kwargs, status in (({"token": "t0ken"}, 404), ({}, 200), ({"token": "t0ken", "docs": True}, 200)):
        with uvicorn_running(create_cloud_app(split_dir, **kwargs)) as url:
            for page in ("/docs", "/openapi.json"):
                assert httpx.get(f"{url}{page}").status_code == status, (kwargs, page)


def test_a_slow_body_gets_408_and_the_server_goes_on(split_dir):
    import json

    version = json.loads((split_dir / "split.json").read_text())["version"]
    server, thread, port = start_uvicorn(create_cloud_app(split_dir, body_timeout=0.5))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall((f"POST /v1/activations HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                          f"X-Earlin-Version: {version}\r\n\r\n").encode() + b"\0" * 10)  # then nothing more
            reply = sock.recv(4096).decode(errors="replace")
        assert reply.startswith("HTTP/1.1 408"), reply[:200]
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
    finally:
        stop_uvicorn(server, thread)


class _DictOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.fc(self.conv(x).mean((2, 3)))}


def test_a_backbone_whose_output_cannot_be_served_is_refused_at_export(tmp_path):
    X, y = make_images(60)
    det = ShallowFeatureOODDetector(_DictOut(), "conv", device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="returns dict, not a tensor"):
        save_split(*det.export_split(), tmp_path, torch.from_numpy(X[:4]), formats=("pt2",))


PROTOCOLS = ["HeaderTimeoutH11", pytest.param("HeaderTimeoutHttpTools", marks=pytest.mark.skipif(
    importlib.util.find_spec("httptools") is None, reason="httptools is not installed"))]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_slow_headers_are_cut_off(split_dir, protocol):
    from earlin_sklearn._server import header_timeout_protocol

    server, thread, port = start_uvicorn(create_cloud_app(split_dir), http=header_timeout_protocol(0.5, protocol))
    assert server.config.http.__mro__[1].__name__ == protocol
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/activations HTTP/1.1\r\nHost: x\r\n")  # and the headers never end
            t0 = time.time()
            assert sock.recv(100) == b""  # closed by the server...
            assert time.time() - t0 < 5  # ...after the header deadline, not never
        # on a keep-alive connection, the deadline starts again after each response
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for _ in range(2):
                time.sleep(0.3)  # each request within the deadline, the two together past it
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = b""
                while not reply.endswith(b'"ok"}'):
                    chunk = sock.recv(1000)
                    assert chunk, "closed while a request was in time"
                    reply += chunk
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # the next request's headers never end
            t0 = time.time()
            assert sock.recv(100) == b""
            assert time.time() - t0 < 3  # the header deadline (0.5 s), not uvicorn's keep-alive timeout (5 s)
        # a normal client on the same server, with keep-alive across requests, is served
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(3):
                assert client.get("/health").status_code == 200
                time.sleep(0.3)
    finally:
        stop_uvicorn(server, thread)
