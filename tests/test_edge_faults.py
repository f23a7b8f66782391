"""The edge runner against faults: nothing lost, every input logged exactly once, resumable."""

import json
import threading
import time

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from earlin_sklearn import ShallowFeatureOODDetector, save_split  # noqa: E402
from earlin_sklearn.edge import EdgeRunner, read_inputs, read_log  # noqa: E402
from earlin_sklearn._server import create_cloud_app  # noqa: E402

from .conftest import free_port, make_images, make_tiny_cnn, start_uvicorn, stop_uvicorn  # noqa: E402


def start(split_dir, port):
    server, thread, _ = start_uvicorn(create_cloud_app(split_dir), port=port)
    return server, thread


stop = stop_uvicorn


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    model = make_tiny_cnn()
    X, y = make_images(90)
    det = ShallowFeatureOODDetector(model, "layer1", device="cpu").fit(X, y)
    split_dir = tmp_path_factory.mktemp("split")
    save_split(*det.export_split(), split_dir, torch.from_numpy(X[:4]), formats=("pt2",))
    port = free_port()
    server, thread = start(split_dir, port)
    yield {"model": model, "det": det, "dir": split_dir, "port": port, "url": f"http://127.0.0.1:{port}"}
    stop(server, thread)


def id_stream(n=24):
    X, y = make_images(n, seed=11)
    return torch.from_numpy(X), y


class Faulty:
    """An httpx transport in front of the real server that fails the first tries of some requests."""

    def __init__(self, url, plan):
        self.real = httpx.Client(base_url=url)
        self.plan = plan  # list of faults, consumed one per request: None = forward
        self.requests = 0

    def __call__(self, request):
        self.requests += 1
        fault = self.plan.pop(0) if self.plan else None
        if fault == "503":
            return httpx.Response(503, text="busy")
        if fault == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if fault == "disconnect":
            raise httpx.RemoteProtocolError("server disconnected mid-stream", request=request)
        if fault == "400":
            return httpx.Response(400, json={"detail": "bad body"})
        real = self.real.post(request.url.path, content=request.content, headers=dict(request.headers))
        return httpx.Response(real.status_code, content=real.content, headers=real.headers)


_OPEN = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _OPEN:
        _OPEN.pop().close()


def runner_with(deployment, plan, retries=3, **kwargs):
    kwargs.setdefault("report_every", 0)  # these tests count upload requests; reports are tests/test_fleet.py's
    runner = EdgeRunner(deployment["dir"], deployment["url"], upload="activations", retries=retries, backoff=0.0,
                        **kwargs)
    faulty = Faulty(deployment["url"], plan)
    headers = runner.client.headers
    runner.client.close()
    runner.client = httpx.Client(base_url=deployment["url"], headers=headers, transport=httpx.MockTransport(faulty))
    _OPEN.extend([faulty.real, runner.client])
    return runner, faulty


def test_retries_ride_out_5xx_timeouts_and_disconnects(deployment, tmp_path):
    X, y = id_stream()
    with torch.no_grad():
        full = deployment["model"](X).argmax(1).numpy()
    runner, faulty = runner_with(deployment, ["503", "timeout", "disconnect", None] * 3)
    with runner:
        records = runner.run(iter(X), labels=iter(y), log=tmp_path / "log.jsonl")  # generators, too
    assert all(r.status == "ok" for r in records)
    uploaded = [r for r in records if r.uploaded]
    assert uploaded and all(r.prediction == full[r.index] for r in uploaded)
    assert sum(r.attempts for r in uploaded) == faulty.requests == len(uploaded) + 9
    logged = [json.loads(line)["index"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(len(X)))


def test_exhausted_retries_are_recorded_and_resumed(deployment, tmp_path):
    X, y = id_stream()
    log = tmp_path / "log.jsonl"
    runner, _ = runner_with(deployment, ["503"] * 4 + [None] * 3 + ["400"], retries=3)
    with runner:
        records = runner.run(X, labels=y, log=log)
    failed = [r.index for r in records if r.status == "failed"]
    uploaded = [r.index for r in records if r.uploaded]
    assert failed == [uploaded[0], uploaded[4]]  # 4 x 503 with 3 retries; a 400 is not retried
    assert "HTTP 503" in records[uploaded[0]].error and "HTTP 400" in records[uploaded[4]].error
    runner, faulty = runner_with(deployment, [])
    with runner:
        resumed = runner.run(X, labels=y, log=log, resume=True)
    assert faulty.requests == 2  # only the two failed inputs were sent again
    assert all(r.status == "ok" for r in resumed)
    logged = sorted(r.index for r in read_log(log))
    assert logged == list(range(len(X)))  # every input exactly once


def test_server_killed_and_restarted_mid_stream(deployment, tmp_path):
    """A real server on its own port, stopped after the first uploads and started again later."""
    port = free_port()
    server, thread = start(deployment["dir"], port)
    X, y = id_stream(40)
    with torch.no_grad():
        full = deployment["model"](X).argmax(1).numpy()
    log = tmp_path / "log.jsonl"
    state = {}

    def inputs():
        for i, x in enumerate(X):
            if i == 10:  # kill the server; bring it back a moment later
                stop(server, thread)

                def restart():
                    time.sleep(0.5)
                    state["server"] = start(deployment["dir"], port)

                threading.Thread(target=restart, daemon=True).start()
            yield x

    try:
        with EdgeRunner(deployment["dir"], f"http://127.0.0.1:{port}", upload="activations", retries=8,
                        backoff=0.1, timeout=5) as runner:
            records = runner.run(inputs(), labels=y, log=log)
    finally:
        for _ in range(50):
            if "server" in state:
                stop(*state["server"])
                break
            time.sleep(0.1)
    assert all(r.status == "ok" for r in records)
    assert all(r.prediction == full[r.index] for r in records if r.uploaded)
    assert sorted(r.index for r in read_log(log)) == list(range(40))
    assert max(r.attempts for r in records) > 1  # the outage was seen and ridden out


def test_refusals_of_the_runner_stop_the_run(deployment):
    X, _ = id_stream(4)
    runner, _ = runner_with(deployment, [])
    runner.client.headers["X-Earlin-Version"] = "0" * 64
    with runner, pytest.raises(RuntimeError, match="409"):
        runner.run(X)


def test_bad_streams_are_errors_not_silent(deployment, tmp_path):
    X, y = id_stream(6)
    runner, _ = runner_with(deployment, [])
    with runner:
        with pytest.raises(ValueError, match="differ in length"):
            runner.run(X, labels=y[:4])
        with pytest.raises(ValueError, match="expects"):
            runner.run([torch.zeros(3, 8, 8)])
        with pytest.raises(ValueError, match="needs the log"):
            runner.run(X, resume=True)
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 12, 12, 3), np.uint8), y=np.arange(3))
    with pytest.raises(ValueError, match="3 labels for 5 images"):
        read_inputs(tmp_path / "d.npz")
    with pytest.raises(ValueError, match="std > 0"):
        runner_with(deployment, [], mean=[0.5] * 3, std=[0.0] * 3)
    np.savez(tmp_path / "e.npz", images=np.zeros((5, 12, 12, 3), np.uint8))
    with pytest.raises(ValueError, match="no array 'x'"):
        read_inputs(tmp_path / "e.npz")
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "imgs" / "a.tiff")
    (tmp_path / "imgs" / "notes.txt").write_text("hi")
    with pytest.warns(UserWarning, match="notes.txt is skipped"):
        X_dir, _ = read_inputs(tmp_path / "imgs")
    assert X_dir.shape == (1, 12, 12, 3) and X_dir.dtype == np.uint8  # TIFF is read, not skipped


def test_unlabelled_streams_run_to_their_end(deployment):
    X, _ = id_stream(5)
    runner, _ = runner_with(deployment, [])
    with runner:
        records = runner.run(iter(X))
    assert [r.index for r in records] == list(range(5)) and all(r.label == -1 for r in records)


def test_the_summary_counts_only_uploads_that_succeeded(deployment):
    from earlin_sklearn.edge import summarize

    X, y = id_stream()
    runner, _ = runner_with(deployment, ["503"] * 4, retries=3)
    with runner:
        records = runner.run(X, labels=y)
    summary = summarize(records)
    assert summary["failed"] == 1
    assert summary["uploaded"] == sum(bool(r.uploaded) for r in records) - 1


def test_a_refused_run_logs_every_input(deployment, tmp_path):
    """The server refusing the runner itself ends the run, and every input still has its one line."""
    X, _ = id_stream(6)
    runner, _ = runner_with(deployment, [])
    runner.client.headers["X-Earlin-Version"] = "0" * 64
    log = tmp_path / "log.jsonl"
    with runner, pytest.raises(RuntimeError, match="409"):
        runner.run(X, log=log)
    records = read_log(log)
    assert [r.index for r in records] == list(range(len(X)))
    refused = [r for r in records if r.status == "refused"]
    assert len(refused) == 1 and refused[0].is_id and "409" in refused[0].error
    assert all(r.status in ("ok", "not run") for r in records if r is not refused[0])
    assert all(r.status == "not run" for r in records if r.index > refused[0].index)


def test_uint8_images_are_normalized_or_refused(deployment, tmp_path):
    """Camera pixels never reach the edge unnormalized: with mean/std they decide as the normalized floats do."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)
    runner, _ = runner_with(deployment, [])
    with runner, pytest.raises(ValueError, match="records no preprocessing"):
        runner.process(pixels[0])
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    runner, _ = runner_with(deployment, [], mean=mean, std=std)
    floats = (pixels.transpose(0, 3, 1, 2) / np.float32(255) - np.array(mean, np.float32)[:, None, None]) \
        / np.array(std, np.float32)[:, None, None]
    with runner:
        for image, x in zip(pixels, floats.astype(np.float32)):
            for camera in (image, torch.from_numpy(image)):  # an array or a uint8 tensor alike
                assert runner.model_input(camera)[0].tobytes() == runner.model_input(x)[0].tobytes()
            assert runner.process(image).score == runner.process(x).score
