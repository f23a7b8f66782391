"""The real cloud server on a free loopback port, the real edge runner against it."""

import json
import time

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from earlin_sklearn import ShallowFeatureOODDetector, save_split  # noqa: E402
from earlin_sklearn.edge import EdgeRunner, choose_upload, read_inputs, summarize  # noqa: E402
from earlin_sklearn.edge._wire import encode  # noqa: E402
from earlin_sklearn._server import create_cloud_app  # noqa: E402

from .conftest import free_port, make_images, make_tiny_cnn, uvicorn_running  # noqa: E402

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    model = make_tiny_cnn()
    X, y = make_images(90)
    det = ShallowFeatureOODDetector(model, "layer1", device="cpu").fit(X, y)
    split_dir = tmp_path_factory.mktemp("split")
    edge, cloud = det.export_split()
    save_split(edge, cloud, split_dir, torch.from_numpy(X[:4]), formats=("pt2",))
    with uvicorn_running(create_cloud_app(split_dir, token=TOKEN, max_bytes=100_000), log_level="warning") as url:
        yield {"model": model, "det": det, "dir": split_dir, "url": url}


def stream():
    X_id, y_id = make_images(20, seed=7)
    X_ood = np.random.default_rng(3).uniform(-3, 3, size=(10, 3, 12, 12)).astype(np.float32)
    return torch.from_numpy(np.concatenate([X_id, X_ood])), np.r_[y_id, -np.ones(10, int)]


@pytest.mark.parametrize("upload,encoding,compression", [
    ("activations", "float32", "none"), ("raw", "float32", "none"), ("activations", "float16", "none"),
    ("activations", "float32", "zstd"), ("raw", "float32", "zstd"), ("activations", "float16", "zstd")])
def test_edge_runner_against_the_server(deployment, upload, encoding, compression, tmp_path):
    if compression == "zstd":
        pytest.importorskip("zstandard")
    X, y = stream()
    with torch.no_grad():
        full = deployment["model"](X).argmax(1).numpy()
    expected_id = deployment["det"].predict(X) == 1
    with EdgeRunner(deployment["dir"], deployment["url"], upload=upload, encoding=encoding, token=TOKEN,
                    compression=compression) as runner:
        records = runner.run(X, labels=y, log=tmp_path / "log.jsonl")
    assert [r.is_id for r in records] == expected_id.tolist()
    assert 0 < sum(expected_id) < len(X)
    for r in records:
        if r.is_id:
            assert r.uploaded == upload and r.bytes_sent > 0
            if encoding == "float32":
                assert r.prediction == full[r.index]  # exactly the in-process full model
        else:
            assert r.uploaded == "" and r.bytes_sent == 0 and r.prediction == -1  # OOD: nothing sent
    if encoding == "float16":
        agree = np.mean([r.prediction == full[r.index] for r in records if r.is_id])
        assert agree >= 0.9
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == len(X) and set(json.loads(lines[0])) >= {"is_id", "score", "bytes_sent", "latency_ms", "prediction"}
    summary = summarize(records)
    assert summary["uploaded"] == sum(expected_id) and summary["bytes_sent"] == sum(r.bytes_sent for r in records)


def test_malformed_requests_are_refused_and_the_server_keeps_serving(deployment):
    manifest = json.loads((deployment["dir"] / "split.json").read_text())
    shapes = [p["shape"] for p in manifest["payload"]]
    good = encode([torch.zeros(1, *s) for s in shapes], "float32")
    auth = {"Authorization": f"Bearer {TOKEN}", "X-Earlin-Version": manifest["version"]}
    with httpx.Client(base_url=deployment["url"]) as c:
        cases = [
            ({"Authorization": "Bearer nope"}, good, 401),
            ({}, good, 401),
            ({**auth, "X-Earlin-Version": "0" * 16}, good, 409),
            ({**auth, "X-Earlin-Encoding": "bfloat16"}, good, 415),
            ({**auth, "X-Earlin-Batch": "two"}, good, 400),
            ({**auth, "X-Earlin-Batch": "0"}, good, 400),
            ({**auth, "X-Earlin-Batch": "2"}, good, 400),  # wrong shape: one input's bytes for two
            ({**auth, "X-Earlin-Encoding": "float16"}, good, 400),  # wrong dtype for the body
            (auth, good[:-10], 400),  # truncated body
            (auth, good + b"\0" * 8, 400),
            (auth, b"\0" * 100_001, 413),  # over the server's limit
            (auth, encode([torch.full((1, *s), float("nan")) for s in shapes], "float32"), 400),
            ({"Authorization": f"Bearer {TOKEN}"}, good, 428),  # the version is required, not optional
            # finite payloads that overflow inside the cloud part: never a class computed from inf/NaN
            (auth, encode([torch.full((1, *s), 3e38) * (-1) ** torch.arange(int(np.prod(s))).reshape(1, *s)
                           for s in shapes], "float32"), 422),
        ]
        for headers, body, status in cases:
            r = c.post("/v1/activations", content=body, headers=headers)
            assert r.status_code == status, (headers, r.status_code, r.text)
            assert r.json()["detail"]
        r = c.post("/v1/raw", content=b"\0" * 7, headers=auth)
        assert r.status_code == 400 and "bytes" in r.json()["detail"]
        # still serving
        ok = c.post("/v1/activations", content=good, headers=auth)
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 1
        health = c.get("/health", headers=auth).json()
        assert health["status"] == "ok" and health["version"] == manifest["version"]
        # /health tells the model version only to a client with the token; /livez tells anyone only "ok"
        assert c.get("/health").status_code == 401
        assert c.get("/livez").json() == {"status": "ok"}
        # the scheme is case-insensitive (RFC 7235), the token is not
        lower = {**auth, "Authorization": f"bearer {TOKEN}"}
        assert c.post("/v1/activations", content=good, headers=lower).status_code == 200
        assert c.get("/health", headers={"Authorization": f"BEARER {TOKEN}"}).status_code == 200
        assert c.get("/health", headers={"Authorization": f"Bearer {TOKEN.upper()}"}).status_code == 401
        assert c.get("/health", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401


def test_zstd_bodies_are_decompressed_with_a_limit(deployment):
    zstandard = pytest.importorskip("zstandard")
    from earlin_sklearn.edge._wire import compress

    manifest = json.loads((deployment["dir"] / "split.json").read_text())
    shapes = [p["shape"] for p in manifest["payload"]]
    payload = [torch.randn(1, *s) for s in shapes]
    plain, packed = encode(payload, "float32"), compress(encode(payload, "float32"), "zstd")
    auth = {"Authorization": f"Bearer {TOKEN}", "X-Earlin-Version": manifest["version"]}
    zstd = {**auth, "X-Earlin-Compression": "zstd"}
    # a bomb: a few hundred bytes that would inflate to 50 MB, with no content size in its header
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 50_000_000)
    with httpx.Client(base_url=deployment["url"]) as c:
        same = [c.post("/v1/activations", content=b, headers=h).json()["predictions"]
                for b, h in ((plain, auth), (packed, zstd))]
        assert same[0] == same[1]
        for body, headers, status in [
            (packed, {**auth, "X-Earlin-Compression": "gzip"}, 415),
            (plain, zstd, 400),  # not a zstd frame
            (packed[:-5], zstd, 400),  # truncated frame
            (compress(plain + b"\0" * 4, "zstd"), zstd, 400),  # decompresses to more than one input's bytes
            (bomb, zstd, 400),
        ]:
            r = c.post("/v1/activations", content=body, headers=headers)
            assert r.status_code == status, (r.status_code, r.text)
        assert len(bomb) < 10_000
        ok = c.post("/v1/activations", content=packed, headers=zstd)
        assert ok.status_code == 200


def test_auto_upload_with_compression_measures_the_first_input(deployment):
    pytest.importorskip("zstandard")
    X, _ = stream()
    with EdgeRunner(deployment["dir"], deployment["url"], upload="auto", token=TOKEN, compression="zstd",
                    uplink_mbit_s=1.0) as runner:
        assert runner.upload == "auto"
        records = runner.run(X[:20])
    uploaded = {r.uploaded for r in records if r.is_id}
    assert len(uploaded) == 1 and runner.upload in ("raw", "activations") and uploaded == {runner.upload}


def test_server_errors_are_reported_by_the_runner(deployment):
    X, _ = stream()
    with EdgeRunner(deployment["dir"], deployment["url"], upload="activations", token="wrong") as runner:
        with pytest.raises(RuntimeError, match="401"):  # CloudRefused: no later upload could succeed
            runner.run(X[:20])


def test_auto_upload_follows_the_cost_model(deployment):
    manifest = json.loads((deployment["dir"] / "split.json").read_text())
    # a layer1 activation (12 x 12 x 12) is 4x the input (3 x 12 x 12): on a slow link, send the input
    assert choose_upload(manifest, uplink_mbit_s=1.0) == "raw"
    # on an infinitely fast link with a slow cloud, send activations (the cloud then runs less)
    assert choose_upload(manifest, uplink_mbit_s=1e12, cloud_gflop_s=1e-3) == "activations"


def test_read_inputs(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (5, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    X, y = read_inputs(tmp_path / "d.npz")  # camera pixels stay pixels: the runner normalizes them
    assert X.dtype == np.uint8 and X.shape == (5, 12, 12, 3) and y.tolist() == [0, 1, 2, 3, 4]
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(x[i]).save(tmp_path / "imgs" / f"{i}.png")
    X, y = read_inputs(tmp_path / "imgs")
    assert X.shape == (3, 12, 12, 3) and y is None
    np.testing.assert_array_equal(X[1], x[1])


def test_the_two_commands(deployment, tmp_path, capsys):
    """`earlin serve-cloud` in its own process, `earlin run-edge` against it, as the docs show."""
    import subprocess
    import sys

    from earlin_sklearn.__main__ import main

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "earlin_sklearn", "serve-cloud", str(deployment["dir"]),
                               "--port", str(port), "--token", TOKEN], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read().decode()
            assert time.time() < deadline, "serve-cloud did not start"
            time.sleep(0.2)
        X, y = stream()
        np.savez(tmp_path / "stream.npz", x=X.numpy(), y=y)
        log = tmp_path / "edge_log.jsonl"
        assert main(["run-edge", str(deployment["dir"]), "--url", f"http://127.0.0.1:{port}", "--input",
                     str(tmp_path / "stream.npz"), "--token", TOKEN, "--upload", "activations", "--log", str(log)]) == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stderr.close()
    out = capsys.readouterr().out
    n_id = int((deployment["det"].predict(X) == 1).sum())
    assert f"30 inputs, {n_id} uploaded (activations, float32)" in out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 30 and sum(r["bytes_sent"] > 0 for r in records) == n_id
    assert [r["label"] for r in records] == y.tolist()


def test_run_edge_checks_the_server_before_the_first_input(deployment, tmp_path, capsys):
    """Down, wrong token, another split, empty token: one line and exit 2 at once, no input processed."""
    from earlin_sklearn.__main__ import main
    from earlin_sklearn.edge import CloudRefused, CloudUnreachable

    X, y = stream()
    np.savez(tmp_path / "stream.npz", x=X.numpy(), y=y)
    log = tmp_path / "edge_log.jsonl"
    base = ["run-edge", str(deployment["dir"]), "--input", str(tmp_path / "stream.npz"), "--log", str(log)]
    t0 = time.perf_counter()
    assert main([*base, "--url", f"http://127.0.0.1:{free_port()}", "--token", TOKEN]) == 2  # nothing listens
    assert time.perf_counter() - t0 < 5
    assert "does not answer" in capsys.readouterr().err and not log.exists()
    assert main([*base, "--url", deployment["url"], "--token", "wrong"]) == 2
    assert "refused the token" in capsys.readouterr().err and not log.exists()
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--url", deployment["url"], "--token", ""])  # $EARLIN_TOKEN unset, expanded to ""
    assert exit_.value.code == 2 and "token is empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="token is empty"):
        EdgeRunner(deployment["dir"], deployment["url"], token="")
    with EdgeRunner(deployment["dir"], deployment["url"], token=TOKEN) as runner:
        assert runner.check_server()["version"] == runner.manifest["version"]
        runner.manifest = {**runner.manifest, "version": "0" * 16}  # as if another split's folder were on the device
        with pytest.raises(CloudRefused, match="serves split version"):
            runner.check_server()
    with EdgeRunner(deployment["dir"], f"http://127.0.0.1:{free_port()}", token=TOKEN) as runner:
        t0 = time.perf_counter()
        with pytest.raises(CloudUnreachable):
            runner.check_server(wait=1.0)
        assert 0.9 < time.perf_counter() - t0 < 5  # it kept asking for `wait` seconds, then gave up


def test_run_edge_warns_when_every_input_is_judged_ood(deployment, tmp_path, capsys):
    from earlin_sklearn.__main__ import main

    X_far = np.random.default_rng(5).uniform(-300, 300, size=(6, 3, 12, 12)).astype(np.float32)
    assert (deployment["det"].predict(X_far) == -1).all()
    np.savez(tmp_path / "far.npz", x=X_far)
    args = ["run-edge", str(deployment["dir"]), "--url", deployment["url"], "--input", str(tmp_path / "far.npz"),
            "--token", TOKEN, "--log", str(tmp_path / "log.jsonl")]
    assert main(args) == 3
    assert "every one of the 6 inputs was judged OOD" in capsys.readouterr().err
    assert main([*args, "--allow-all-ood"]) == 0
    assert "judged OOD" not in capsys.readouterr().err
