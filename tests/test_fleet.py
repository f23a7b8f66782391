"""Serving a fleet: dynamic batching (per-request answers and errors, back-pressure) and /metrics."""

import asyncio
import json
import threading

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from earlin_sklearn import ShallowFeatureOODDetector, save_split  # noqa: E402
from earlin_sklearn._batching import DynamicBatcher, QueueFull  # noqa: E402
from earlin_sklearn._server import create_cloud_app  # noqa: E402
from earlin_sklearn.edge._wire import encode  # noqa: E402

from .conftest import make_images, make_tiny_cnn, uvicorn_running  # noqa: E402

TOKEN = "fleet-token"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    model = make_tiny_cnn()
    X, y = make_images(60)
    det = ShallowFeatureOODDetector(model, "layer1", device="cpu").fit(X, y)
    directory = tmp_path_factory.mktemp("split")
    save_split(*det.export_split(), directory, torch.from_numpy(X[:4]), formats=("pt2",))
    manifest = json.loads((directory / "split.json").read_text())
    edge, _ = det.export_split()
    payload = edge(torch.from_numpy(X[:32])).payload
    payloads = [p.numpy() for p in ((payload,) if isinstance(payload, torch.Tensor) else payload)]
    full = model(torch.from_numpy(X[:32])).argmax(1).tolist()
    return {"dir": directory, "manifest": manifest, "payloads": payloads, "expected": full}


def _headers(manifest, batch=1):
    return {"Authorization": f"Bearer {TOKEN}", "X-Earlin-Version": manifest["version"], "X-Earlin-Batch": str(batch)}


def _post_all(url, bodies, headers):
    """Send every body at once (one thread each, as a fleet of devices would); the responses, in order."""
    out = [None] * len(bodies)

    def send(i):
        with httpx.Client(base_url=url, timeout=30) as c:
            out[i] = c.post("/v1/activations", content=bodies[i], headers=headers)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_single_inputs_are_batched_and_each_gets_its_own_answer(split):
    app = create_cloud_app(split["dir"], token=TOKEN, max_wait_ms=50, batch_inputs=64)
    bodies = [encode([torch.from_numpy(p[i : i + 1]) for p in split["payloads"]], "float32") for i in range(32)]
    # one of them overflows inside the cloud part: it alone gets 422
    bad = encode([torch.full((1, *p.shape[1:]), 3e38) * (-1) ** torch.arange(int(np.prod(p.shape[1:]))).reshape(
        1, *p.shape[1:]) for p in split["payloads"]], "float32")
    bodies[5] = bad
    with uvicorn_running(app, log_level="warning") as url:
        responses = _post_all(url, bodies, _headers(split["manifest"]))
        metrics = httpx.get(url + "/metrics", headers=_headers(split["manifest"])).text
        assert httpx.get(url + "/metrics").status_code == 401  # the token applies
    assert responses[5].status_code == 422
    answers = [r.json() for i, r in enumerate(responses) if i != 5]
    assert all(r.status_code == 200 for i, r in enumerate(responses) if i != 5)
    assert [a["predictions"][0] for a in answers] == [p for i, p in enumerate(split["expected"]) if i != 5]
    assert max(a["batch_inputs"] for a in answers) > 1  # requests shared a batch
    # the Prometheus series, with the counts of this run
    assert 'earlin_requests_total{route="/v1/activations",status="200"} 31.0' in metrics
    assert 'earlin_requests_total{route="/v1/activations",status="422"} 1.0' in metrics
    assert "earlin_batch_inputs_bucket" in metrics and "earlin_request_seconds_bucket" in metrics
    assert 'earlin_received_bytes_total{encoding="float32"}' in metrics
    assert 'earlin_queue_depth{route="activations"} 0.0' in metrics
    runs = float(metrics.split("earlin_batch_inputs_count ")[1].split()[0])
    assert runs < 31  # fewer runs of the cloud part than requests


def test_batching_off_runs_each_request_alone(split):
    app = create_cloud_app(split["dir"], token=TOKEN, max_wait_ms=0, batch_inputs=1)
    bodies = [encode([torch.from_numpy(p[i : i + 1]) for p in split["payloads"]], "float32") for i in range(8)]
    with uvicorn_running(app, log_level="warning") as url:
        responses = _post_all(url, bodies, _headers(split["manifest"]))
    assert [r.json()["batch_inputs"] for r in responses] == [1] * 8
    assert [r.json()["predictions"][0] for r in responses] == split["expected"][:8]


def test_batcher_keeps_order_isolates_failures_and_pushes_back():
    calls = []

    def compute(tensors):
        x = tensors[0]
        calls.append(x.shape[0])
        if (x < 0).any():
            raise ValueError("negative input")
        return x * 2

    async def scenario():
        batcher = DynamicBatcher(compute, max_batch=8, max_wait_ms=20, max_queue=10)
        inputs = [torch.full((1, 2), float(i)) for i in range(6)] + [torch.full((1, 2), -1.0)]
        results = await asyncio.gather(*[batcher.submit([x]) for x in inputs], return_exceptions=True)
        for i, r in enumerate(results[:6]):
            assert torch.equal(r[0], torch.full((1, 2), 2.0 * i))
        assert isinstance(results[6], ValueError)  # only the request at fault fails
        assert calls[0] == 7  # one batched run (that failed), then each alone
        # back-pressure: more inputs waiting than max_queue
        batcher2 = DynamicBatcher(lambda t: t[0], max_batch=2, max_wait_ms=50, max_queue=3)
        first = asyncio.ensure_future(batcher2.submit([torch.zeros(3, 1)]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher2.submit([torch.zeros(1, 1)])
        assert (await first)[0].shape == (3, 1)  # a request larger than max_batch runs alone
        # a request over the batch limit starts the next batch: every request is answered
        batcher3 = DynamicBatcher(lambda t: t[0] + 1, max_batch=4, max_wait_ms=10, max_queue=100)
        sizes = [3, 3, 1, 4, 2]
        outs = await asyncio.gather(*[batcher3.submit([torch.full((n, 1), float(n))]) for n in sizes])
        assert [o[0].shape[0] for o in outs] == sizes and all(o[2] <= 4 for o in outs)

    asyncio.run(scenario())


def test_a_full_queue_answers_503_with_retry_after(split):
    from fastapi.testclient import TestClient

    app = create_cloud_app(split["dir"], token=TOKEN, max_queue=300)
    body = encode([torch.from_numpy(p[:1]) for p in split["payloads"]], "float32")
    client = TestClient(app)
    assert client.post("/v1/activations", content=body, headers=_headers(split["manifest"])).status_code == 200
    app.state.batchers["activations"].waiting = 300  # as if 300 inputs were waiting for a batch
    busy = client.post("/v1/activations", content=body, headers=_headers(split["manifest"]))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
    with pytest.raises(ValueError, match="max_queue"):
        create_cloud_app(split["dir"], max_queue=10, max_batch=256)  # a request could never fit


def test_memory_is_handed_back_once_large_requests_stop(split):
    """After a request of at least 1 MiB the server calls malloc_trim(0) once such requests stop (glibc only):
    benchmarks/bench_server.py measures the resident memory this gives back."""
    from earlin_sklearn._allocator import glibc

    if glibc() is None:
        pytest.skip("not glibc")
    import time

    app = create_cloud_app(split["dir"], token=TOKEN, max_batch=256)
    app.state.trimmer.delay = 0.2
    big = encode([torch.from_numpy(np.repeat(p[:1], 256, axis=0)) for p in split["payloads"]], "float32")
    assert len(big) >= 1 << 20
    small = encode([torch.from_numpy(p[:1]) for p in split["payloads"]], "float32")
    with uvicorn_running(app, log_level="warning") as url:
        assert httpx.post(url + "/v1/activations", content=small, headers=_headers(split["manifest"])).status_code == 200
        time.sleep(0.5)
        assert app.state.trimmer.trims == 0  # small requests never trim
        r = httpx.post(url + "/v1/activations", content=big, headers=_headers(split["manifest"], 256), timeout=60)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 256
        deadline = time.time() + 10
        while app.state.trimmer.trims == 0 and time.time() < deadline:
            time.sleep(0.05)
    assert app.state.trimmer.trims == 1


def test_the_batcher_follows_its_event_loop():
    """Each asyncio.run (as each test-client session) has its own loop: the batcher starts again in the new one."""
    batcher = DynamicBatcher(lambda t: t[0] * 3, max_batch=4, max_wait_ms=1)
    for _ in range(3):
        out = asyncio.run(batcher.submit([torch.ones(2, 1)]))
        assert torch.equal(out[0], torch.full((2, 1), 3.0))


def test_a_batch_waits_only_for_requests_still_on_their_way():
    """Announced requests (the server's ``expecting``): a batch waits for those not yet submitted, and not for
    requests that are only being answered (the window here is 5 s: a wrong wait fails the timing by seconds)."""
    sizes = []

    def compute(tensors):
        sizes.append(tensors[0].shape[0])
        return tensors[0]

    async def request(batcher, delay=0.0, linger=0.0):
        with batcher.expecting():
            await asyncio.sleep(delay)  # reading the body
            out = await batcher.submit([torch.ones(1, 1)])
            await asyncio.sleep(linger)  # writing the answer: announced still, no longer on its way
            return out

    async def scenario():
        loop = asyncio.get_running_loop()
        batcher = DynamicBatcher(compute, max_batch=8, max_wait_ms=5000)
        t0 = loop.time()
        await request(batcher)  # a lone client: no wait
        assert loop.time() - t0 < 2
        # two announced at once, one submitting later: they share a batch, without the full window
        t0 = loop.time()
        await asyncio.gather(request(batcher), request(batcher, delay=0.2))
        assert sizes[-1] == 2 and loop.time() - t0 < 2
        # a request being answered does not hold the next batch back
        t0 = loop.time()
        first = asyncio.ensure_future(request(batcher, linger=1.0))
        await asyncio.sleep(0.1)
        await request(batcher)
        assert loop.time() - t0 < 0.9 and sizes[-2:] == [1, 1]
        await first
        assert batcher.arriving == 0

    asyncio.run(scenario())


def test_the_batcher_without_announcements_waits_its_window():
    async def scenario():
        batcher = DynamicBatcher(lambda t: t[0], max_batch=8, max_wait_ms=200)
        loop = asyncio.get_running_loop()
        late = asyncio.ensure_future(asyncio.sleep(0.05))
        t0 = loop.time()
        first = asyncio.ensure_future(batcher.submit([torch.ones(1, 1)]))
        await late
        second = await batcher.submit([torch.ones(1, 1)])
        assert (await first)[2] == 2 and second[2] == 2 and loop.time() - t0 >= 0.15

    asyncio.run(scenario())


def test_drift_alarms_catch_a_drop_and_stay_quiet_at_the_target():
    """A device at the target TPR for 2,000 reports of 100 inputs: false alarms counted (the bound is 3 tests x
    alpha x 2,000 = 0.6 expected); a device whose acceptance drops from 95% to 60%: alarmed at its first report."""
    from earlin_sklearn._drift import DriftMonitor, outside_band

    rng = np.random.default_rng(0)
    quiet = DriftMonitor(0.95, alpha=1e-4)
    false_alarms = sum(len(quiet.report("cam-1", 100, int(rng.binomial(100, 0.95)))) for _ in range(2000))
    assert false_alarms <= 3, false_alarms
    monitor = DriftMonitor(0.95, alpha=1e-4)
    for _ in range(20):  # a history at the target first
        monitor.report("cam-2", 100, int(rng.binomial(100, 0.95)))
    first_bad = monitor.report("cam-2", 100, int(rng.binomial(100, 0.60)))
    assert "report" in first_bad and "device" in first_bad
    # a slow drift (95% -> 90%) escapes one report of 100 but not the pooled window of 10 reports
    slow = DriftMonitor(0.95, alpha=1e-4)
    raised = [slow.report("cam-3", 100, int(rng.binomial(100, 0.90))) for _ in range(10)]
    assert any("device" in r for r in raised)
    assert not outside_band(95, 100, 0.95, 1e-4) and outside_band(60, 100, 0.95, 1e-4)
    assert outside_band(100_000, 100_000, 0.95, 1e-4)  # accepting everything is a drift too (a broken threshold)
    everything = DriftMonitor(1.0)  # target_tpr=1: every ID input is accepted
    assert everything.report("cam-4", 50, 50) == [] and "report" in everything.report("cam-4", 50, 49)


def test_the_runner_reports_and_the_server_alarms(split, tmp_path):
    from earlin_sklearn.edge import EdgeRunner

    app = create_cloud_app(split["dir"], token=TOKEN)
    far = np.random.default_rng(1).uniform(-40, 40, size=(30, 3, 12, 12)).astype(np.float32)  # OOD: rejected
    with uvicorn_running(app, log_level="warning") as url:
        with EdgeRunner(split["dir"], url, token=TOKEN, report_every=10, device="cam-7") as runner:
            records = runner.run(far)
        metrics = httpx.get(url + "/metrics", headers=_headers(split["manifest"])).text
        bad = httpx.post(url + "/v1/report", json={"device": "cam 7", "seen": 1, "accepted": 2},
                         headers=_headers(split["manifest"]))
        unauthorized = httpx.post(url + "/v1/report", json={"device": "x", "seen": 1, "accepted": 1},
                                  headers={"X-Earlin-Version": split["manifest"]["version"]})
    assert sum(r.is_id for r in records) < 5
    assert len(runner.reports) == 3 and all("report" in r["alarms"] for r in runner.reports)
    assert app.state.monitor.totals["cam-7"] == [30, sum(r.is_id for r in records)]
    assert "earlin_reports_total 3.0" in metrics and 'earlin_drift_alarms_total{scope="report"} 3.0' in metrics
    assert "earlin_devices 1.0" in metrics
    assert bad.status_code == 400 and unauthorized.status_code == 401
