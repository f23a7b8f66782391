"""``earlin serve-cloud --workers 2``: uvicorn's worker processes, /metrics summed over them, a clean shutdown."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from earlin_sklearn import ShallowFeatureOODDetector, save_split  # noqa: E402
from earlin_sklearn.edge._wire import encode  # noqa: E402

from .conftest import make_images, make_tiny_cnn  # noqa: E402

TOKEN = "workers-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_workers_serve_and_their_metrics_add_up(tmp_path):
    X, y = make_images(60)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y)
    save_split(*det.export_split(), tmp_path / "split", torch.from_numpy(X[:4]), formats=("pt2",))
    edge, cloud = det.export_split()
    with torch.inference_mode():
        payload = edge(torch.from_numpy(X[:1])).payload
        expected = int(cloud(payload).argmax(1))
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "earlin_sklearn", "serve-cloud", str(tmp_path / "split"),
                               "--port", str(port), "--workers", "2", "--token", TOKEN, "--graceful-seconds", "5"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/livez", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("the server did not come up")
        version = httpx.get(url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()["version"]
        headers = {"Authorization": f"Bearer {TOKEN}", "X-Earlin-Version": version, "X-Earlin-Batch": "1",
                   "X-Earlin-Encoding": "float32", "Content-Type": "application/octet-stream"}
        body = encode([payload.numpy()], "float32")
        answers = [httpx.post(url + "/v1/activations", content=body, headers=headers) for _ in range(40)]  # a
        # new connection each: the workers share the listening socket
        assert all(a.status_code == 200 and a.json()["predictions"] == [expected] for a in answers)
        scrapes = [httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text for _ in range(6)]
        workers = {m.group(1) for m in (re.match(r"\w+_(\d+)\.db$", p.name) for p in metrics_dir.iterdir()) if m}
        assert len(workers) == 2, sorted(p.name for p in metrics_dir.iterdir())  # two processes keep metrics
        for text in scrapes:  # whichever worker answers the scrape, it reports the sum over both
            line = re.search(r'^earlin_requests_total\{route="/v1/activations",status="200"\} (\S+)$', text, re.M)
            assert line and float(line.group(1)) == 40.0, text[:2000]
            batches = re.search(r"^earlin_batch_inputs_count (\S+)$", text, re.M)
            assert batches and 1 <= float(batches.group(1)) <= 40
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            out, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            out, _ = server.communicate()
    assert server.returncode == 0, out[-3000:]
    assert out.count("Finished server process") == 2, out[-3000:]  # each worker shut down cleanly
