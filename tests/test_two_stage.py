"""TwoStageDetector: EARLIN on the edge, a logit detector in the cloud, exported and served together."""

import json

import numpy as np
import pytest
import torch

from earlin_sklearn import ShallowFeatureOODDetector, TwoStageDetector, load_split, save_split

from .conftest import make_images, make_tiny_cnn, served_records, uvicorn_running


@pytest.fixture(scope="module")
def fitted():
    X, y = make_images(300)
    model = make_tiny_cnn()
    two = TwoStageDetector(ShallowFeatureOODDetector(model, "layer1", device="cpu"), target_tpr=0.9).fit(X, y)
    return two, model


def test_budget_is_split_between_the_stages(fitted):
    two, _ = fitted
    assert two.edge_.target_tpr == pytest.approx(0.9 ** 0.5) and two.cloud_.target_tpr == pytest.approx(0.9 ** 0.5)
    X_new, _ = make_images(400, seed=3)
    accepted = np.mean(two.predict(X_new) == 1)
    both = np.mean((two.edge_.predict(X_new) == 1) & (two.cloud_.predict(X_new) == 1))
    assert accepted == both  # ID means accepted by both stages
    assert 0.8 < accepted <= 1.0
    with pytest.raises(ValueError, match="edge_share"):
        TwoStageDetector(two.edge, edge_share=1.5).fit(*make_images(30))


def test_export_carries_the_cloud_verdict(fitted, tmp_path):
    two, model = fitted
    X, _ = make_images(40, seed=5)
    x = torch.from_numpy(X)
    edge, cloud = two.export_split()
    out = edge(x)
    logits, score, is_id = cloud(out.payload)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score.numpy(), two.cloud_.score_samples(X), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(is_id.numpy(), two.cloud_.predict(X) == 1)
    paths = save_split(edge, cloud, tmp_path, x[:4])  # .pt2 and ONNX
    loaded = load_split(tmp_path, as_split=True)
    manifest, loaded_cloud = loaded.manifest, loaded.cloud
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(paths["cloud.onnx"]))
    payload = out.payload if isinstance(out.payload, tuple) else (out.payload,)
    onnx_out = session.run(None, {i.name: p.numpy() for i, p in zip(session.get_inputs(), payload)})
    np.testing.assert_array_equal(onnx_out[2], is_id.numpy())
    assert manifest["cloud_detector"]["method"] == "energy"
    _, _, loaded_is_id = loaded_cloud(edge(x).payload)
    np.testing.assert_array_equal(loaded_is_id.numpy(), is_id.numpy())


def test_the_server_answers_with_the_cloud_verdict(fitted, tmp_path):
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    two, _ = fitted
    X, _ = make_images(30, seed=9)
    records = served_records(two, X, tmp_path)
    cloud_ok = two.cloud_.predict(X) == 1
    uploaded = [r for r in records if r.uploaded]
    assert uploaded and all(r.cloud_is_id == bool(cloud_ok[r.index]) for r in uploaded)
    assert all(r.cloud_is_id is None for r in records if not r.uploaded)
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["cloud_is_id"] in (True, False, None)


def test_png_and_activation_uploads_get_the_in_process_answers_from_the_two_stage_server(fitted, tmp_path):
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from earlin_sklearn import EdgeRunner
    from earlin_sklearn._server import create_cloud_app

    two, model = fitted
    X, _ = make_images(40, seed=11)
    pixels = (np.clip(X * 0.25 + 0.5, 0, 1) * 255).round().astype(np.uint8)  # camera images...
    inputs = (pixels.astype(np.float32) / 255.0 - 0.5) / 0.25  # ...and the inputs the split's preprocessing makes
    edge, cloud = two.export_split()
    save_split(edge, cloud, tmp_path / "split", torch.from_numpy(inputs[:4]), formats=("pt2",),
               preprocessing={"mean": [0.5] * 3, "std": [0.25] * 3})
    with torch.no_grad():
        classes = model(torch.from_numpy(inputs)).argmax(1).numpy()
    edge_ok = two.edge_.predict(inputs) == 1
    cloud_ok = two.cloud_.predict(inputs) == 1
    assert edge_ok.sum() >= 20  # most of these ID images are uploaded
    answers = {}
    with uvicorn_running(create_cloud_app(tmp_path / "split")) as url:
        for encoding, upload, data in (("png", "raw", pixels.transpose(0, 2, 3, 1)),
                                       ("float32", "activations", torch.from_numpy(inputs))):
            with EdgeRunner(tmp_path / "split", url, upload=upload, encoding=encoding) as runner:
                answers[encoding] = runner.run(data)
        manifest = json.loads((tmp_path / "split" / "split.json").read_text())
        headers = {"X-Earlin-Version": manifest["version"], "X-Earlin-Encoding": "png"}
        bad = httpx.post(f"{url}/v1/raw", content=b"\x89PNG\r\n\x1a\n" + b"\0" * 40, headers=headers)
        assert 400 <= bad.status_code < 500
    for encoding, records in answers.items():
        assert [r.is_id for r in records] == edge_ok.tolist()
        for r in records:
            if r.uploaded:
                assert r.prediction == classes[r.index], encoding
                assert r.cloud_is_id == bool(cloud_ok[r.index]), encoding
    assert [r.prediction for r in answers["png"]] == [r.prediction for r in answers["float32"]]
