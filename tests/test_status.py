"""The operator's status page: what it shows, who may see it, and that a real browser renders it."""

import base64
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from earlin_sklearn import ShallowFeatureOODDetector, save_split  # noqa: E402
from earlin_sklearn._server import create_cloud_app  # noqa: E402

from .conftest import make_images, make_tiny_cnn, uvicorn_running  # noqa: E402

TOKEN = "status-token"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    X, y = make_images(60)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y)
    directory = tmp_path_factory.mktemp("split")
    save_split(*det.export_split(), directory, torch.from_numpy(X[:4]), formats=("pt2",))
    edge, _ = det.export_split()
    payload = edge(torch.from_numpy(X[:1])).payload.numpy()
    return {"dir": directory, "manifest": json.loads((directory / "split.json").read_text()), "payload": payload}


def drive_fleet(client, manifest, headers, payload, rng):
    """Two cameras at the target rate, one whose acceptance drops to 60%, and a few inference requests."""
    report = {**headers, "X-Earlin-Version": manifest["version"]}
    for i in range(12):
        for device, rate in (("cam-1", 0.95), ("cam-2", 0.95), ("cam-3", 0.95 if i < 6 else 0.6)):
            answer = client.post("/v1/report", json={"device": device, "seen": 100,
                                                      "accepted": int(rng.binomial(100, rate))}, headers=report)
            assert answer.status_code == 200
    body = payload.astype(np.float32).tobytes()
    for _ in range(5):
        answer = client.post("/v1/activations", content=body, headers={
            **report, "X-Earlin-Batch": "1", "X-Earlin-Encoding": "float32",
            "Content-Type": "application/octet-stream"})
        assert answer.status_code == 200, answer.text


def test_status_page_shows_devices_alarms_and_traffic(split):
    from fastapi.testclient import TestClient

    app = create_cloud_app(split["dir"], token=TOKEN)
    with TestClient(app) as client:
        drive_fleet(client, split["manifest"], {"Authorization": f"Bearer {TOKEN}"}, split["payload"],
                    np.random.default_rng(0))
        page = client.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    text = page.text
    assert text.count("<svg") == 3 and "<script" not in text
    for device in ("cam-1", "cam-2", "cam-3"):
        assert device in text
    alarms = app.state.monitor.alarm_log
    # only the camera that drifted has alarms of its own (a fleet alarm can follow any camera's report)
    assert alarms and {d for _, d, scope, _, _ in alarms if scope != "fleet"} == {"cam-3"}
    assert '<tr class=""><td>cam-1</td>' in text
    assert '<tr class="alarm"><td>cam-3</td>' in text  # and the table marks it
    assert "devices reporting: <b>3</b>" in text
    assert "req/s" in text and "p99" in text


def test_status_page_wants_the_token_and_lets_a_browser_ask_for_it(split):
    from fastapi.testclient import TestClient

    with TestClient(create_cloud_app(split["dir"], token=TOKEN)) as client:
        bare = client.get("/status")
        wrong = client.get("/status", headers={"Authorization": "Basic " + base64.b64encode(b"me:nope").decode()})
        basic = client.get("/status", headers={"Authorization": "Basic " + base64.b64encode(
            f"operator:{TOKEN}".encode()).decode()})
        garbled = client.get("/status", headers={"Authorization": "Basic %%%"})
        basic_elsewhere = client.get("/health", headers={"Authorization": "Basic " + base64.b64encode(
            f"operator:{TOKEN}".encode()).decode()})
    assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Basic")
    assert wrong.status_code == 401 and garbled.status_code == 401
    assert basic.status_code == 200 and "earlin cloud status" in basic.text
    assert basic_elsewhere.status_code == 401  # the machine routes take the bearer token only


def test_status_page_renders_in_headless_chromium(split, tmp_path):
    """Debian's chromium, headless, at 1280 px: the DOM it built holds the three plots and the devices."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    app = create_cloud_app(split["dir"])  # no token: a browser on the operator's own machine
    with uvicorn_running(app, log_level="warning") as url:
        with httpx.Client(base_url=url) as client:
            drive_fleet(client, split["manifest"], {}, split["payload"], np.random.default_rng(1))
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--window-size=1280,1100", f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run([chromium, *flags, "--dump-dom", url + "/status"], capture_output=True, text=True,
                             timeout=120)
        shot = tmp_path / "status.png"
        subprocess.run([chromium, *flags, f"--screenshot={shot}", url + "/status"], capture_output=True,
                       timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 3 and "cam-3" in dom.stdout and "polyline" in dom.stdout
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_request_log_bins_by_time_and_route():
    from earlin_sklearn._metrics import RequestLog

    log = RequestLog(size=100)
    for age, seconds in ((1, 0.010), (2, 0.020), (3, 0.030), (15, 0.5)):
        log.add("/v1/activations", seconds, 200, now=1000.0 - age)
    log.add("/metrics", 9.0, 200, now=999.0)  # another route: not counted
    bins = log.binned(now=1000.0, span=30.0, width=10.0, routes={"/v1/activations"})
    assert [b[0] for b in bins] == [-20.0, -10.0, 0.0]
    assert bins[2][1] == pytest.approx(0.3) and bins[2][2] == pytest.approx(20.0)  # three requests, median 20 ms
    assert bins[1][1] == pytest.approx(0.1) and bins[1][3] == pytest.approx(500.0)
    assert bins[0][1] == 0.0 and np.isnan(bins[0][2])
    for i in range(150):
        log.add("/v1/raw", 0.001, 200, now=999.0)
    assert len(log.entries) == 100  # bounded, whatever the traffic
