"""The cloud server with its parts in ONNX Runtime (runtime="onnxruntime", serve-cloud --runtime): the PyTorch
parts' answers, batched, for activations, raw inputs and a two-stage split's verdicts; refusals up front."""

import json
import threading

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("onnxruntime")

from earlin_sklearn import ShallowFeatureOODDetector, TwoStageDetector, save_split  # noqa: E402
from earlin_sklearn._server import create_cloud_app  # noqa: E402
from earlin_sklearn.edge._wire import encode  # noqa: E402
from earlin_sklearn.exceptions import SplitVerificationError  # noqa: E402

from .conftest import make_images, make_tiny_cnn, uvicorn_running  # noqa: E402


def _split(tmp_path_factory, estimator, X, y, name):
    est = estimator.fit(X[:200], y[:200])
    directory = tmp_path_factory.mktemp(name)
    save_split(*est.export_split(), directory, torch.from_numpy(X[:4]), formats=("pt2", "onnx"))
    return directory, json.loads((directory / "split.json").read_text())


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    X, y = make_images(260)
    model = make_tiny_cnn()
    one = _split(tmp_path_factory, ShallowFeatureOODDetector(model, "layer1", device="cpu"), X, y, "one")
    two = _split(tmp_path_factory, TwoStageDetector(ShallowFeatureOODDetector(model, "layer1", device="cpu"),
                                                    target_tpr=0.9), X, y, "two")
    from earlin_sklearn.models import cifar_resnet

    torch.manual_seed(0)
    Xr = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    # cut inside a residual block: two tensors cross, cloud.onnx takes both
    skip = _split(tmp_path_factory, ShallowFeatureOODDetector(cifar_resnet(20), "layer1.1.relu1", n_channels=12,
                                                              device="cpu"), Xr, np.arange(64) % 4, "skip")
    return {"one": one, "two": two, "skip": skip, "X": X[200:], "Xr": Xr}


def _answers(directory, manifest, bodies, route, runtime):
    """Every body sent at once (one thread each), to a server of ``runtime``: the JSON answers, in order."""
    app = create_cloud_app(directory, max_wait_ms=50, batch_inputs=64, runtime=runtime)
    assert all((type(part).__module__ == "earlin_sklearn._cloud_onnx") == (runtime == "onnxruntime")
               for part in app.state.parts)  # ONNX Runtime sessions, or the PyTorch programs
    headers = {"X-Earlin-Version": manifest["version"], "X-Earlin-Batch": "1", "X-Earlin-Encoding": "float32"}
    out = [None] * len(bodies)
    with uvicorn_running(app, log_level="warning") as url:
        def send(i):
            with httpx.Client(base_url=url, timeout=30) as c:
                out[i] = c.post(route, content=bodies[i], headers=headers)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(r.status_code == 200 for r in out), [r.text for r in out if r.status_code != 200]
    return [r.json() for r in out]


@pytest.mark.parametrize("route", ["/v1/activations", "/v1/raw"])
@pytest.mark.parametrize("which", ["one", "skip"])
def test_onnx_runtime_answers_as_the_torch_parts(splits, route, which):
    directory, manifest = splits[which]
    X = torch.from_numpy((splits["X"] if which == "one" else splits["Xr"])[:24])
    if route == "/v1/raw":
        bodies = [encode([X[i : i + 1]], "float32") for i in range(len(X))]
    else:
        from earlin_sklearn import load_split

        edge, _ = load_split(directory, as_split=True)
        with torch.inference_mode():
            payload = edge(X).payload
        payload = (payload,) if isinstance(payload, torch.Tensor) else payload
        bodies = [encode([p[i : i + 1] for p in payload], "float32") for i in range(len(X))]
    torch_answers = _answers(directory, manifest, bodies, route, "torch")
    onnx_answers = _answers(directory, manifest, bodies, route, "onnxruntime")
    assert [a["predictions"] for a in onnx_answers] == [a["predictions"] for a in torch_answers]
    assert max(a["batch_inputs"] for a in onnx_answers) > 1  # batched as the torch parts are


def test_onnx_runtime_serves_the_cloud_stage_verdicts(splits):
    directory, manifest = splits["two"]
    from earlin_sklearn import load_split

    edge, _ = load_split(directory, as_split=True)
    X = torch.from_numpy(splits["X"][:16])
    with torch.inference_mode():
        payload = edge(X).payload
    payload = (payload,) if isinstance(payload, torch.Tensor) else payload
    bodies = [encode([p[i : i + 1] for p in payload], "float32") for i in range(len(X))]
    torch_answers = _answers(directory, manifest, bodies, "/v1/activations", "torch")
    onnx_answers = _answers(directory, manifest, bodies, "/v1/activations", "onnxruntime")
    for a, b in zip(onnx_answers, torch_answers):
        assert a["predictions"] == b["predictions"] and a["cloud_is_id"] == b["cloud_is_id"]
        np.testing.assert_allclose(a["cloud_score"], b["cloud_score"], rtol=1e-4, atol=1e-5)


def test_onnx_runtime_refuses_what_it_cannot_serve(splits, tmp_path):
    directory, _ = splits["one"]
    with pytest.raises(ValueError, match="runtime must be one of"):
        create_cloud_app(directory, runtime="tensorflow")
    X, y = make_images(60)
    pt2_only = tmp_path / "pt2"
    save_split(*ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y).export_split(),
               pt2_only, torch.from_numpy(X[:2]), formats=("pt2",))
    with pytest.raises(ValueError, match="cloud.onnx.*formats"):
        create_cloud_app(pt2_only, runtime="onnxruntime")
    from earlin_sklearn._server import serve

    with pytest.raises(ValueError, match="cloud.onnx"):  # before any worker starts
        serve(pt2_only, workers=2, runtime="onnxruntime")
    # a cloud.onnx edited after saving is refused, as every sealed file is
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in directory.iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    data = bytearray((edited / "cloud.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (edited / "cloud.onnx").write_bytes(bytes(data))
    with pytest.raises(SplitVerificationError, match="cloud.onnx"):
        create_cloud_app(edited, runtime="onnxruntime")


def test_serve_cloud_passes_runtime_and_access_log_to_the_server(splits, monkeypatch):
    import uvicorn

    from earlin_sklearn.__main__ import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(app=app, **options))
    directory, _ = splits["one"]
    assert main(["serve-cloud", str(directory), "--runtime", "onnxruntime", "--no-access-log"]) in (0, None)
    assert seen["access_log"] is False
    assert [type(part).__name__ for part in seen["app"].state.parts] == ["OnnxEdge", "OnnxCloud"]
