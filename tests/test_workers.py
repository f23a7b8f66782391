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


def test_each_worker_runs_with_the_servers_thread_setting(tmp_path, monkeypatch):
    """uvicorn spawns its workers: they would start with torch's default threads (every core, each worker), not
    ``--threads``; the setting travels in the workers' configuration."""
    import uvicorn

    from earlin_sklearn._constants import HEADER_TIMEOUT_ENV
    from earlin_sklearn._metrics import MULTIPROC_ENV
    from earlin_sklearn._server import APP_CONFIG_ENV, app_from_environment, serve

    X, y = make_images(60)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y)
    save_split(*det.export_split(), tmp_path / "split", torch.from_numpy(X[:4]), formats=("pt2",))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # no process starts; serve writes the configuration
    for name in (APP_CONFIG_ENV, HEADER_TIMEOUT_ENV, MULTIPROC_ENV):  # what serve sets: restored after the test
        monkeypatch.setenv(name, "")
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serve(tmp_path / "split", workers=2)
        assert '"threads": 1' in os.environ[APP_CONFIG_ENV]
        torch.set_num_threads(2)  # what a spawned worker starts with on this machine
        app_from_environment()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
