"""Raw uploads as image files: the split carries its preprocessing, the server decodes PNG/JPEG with Pillow,
the edge runner uploads the camera image."""

import io
import json

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from earlin_sklearn import EdgeRunner, ShallowFeatureOODDetector, save_split  # noqa: E402
from earlin_sklearn.edge._wire import decode_image, encode_image, preprocess  # noqa: E402
from earlin_sklearn._server import create_cloud_app  # noqa: E402

from .conftest import make_tiny_cnn, uvicorn_running  # noqa: E402

PRE = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}
SHAPE = (3, 12, 12)


def camera_images(n, seed=0):
    """Smooth uint8 images (so that JPEG keeps them close)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(40, 215, (n, 1, 1, 3))
    ramp = np.linspace(-30, 30, 12)[None, :, None, None] + np.linspace(-20, 20, 12)[None, None, :, None]
    return np.clip(base + ramp * rng.uniform(0.5, 1.5, (n, 1, 1, 1)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = make_tiny_cnn()
    images = camera_images(120)
    X = np.stack([preprocess(im, SHAPE, PRE) for im in images])
    det = ShallowFeatureOODDetector(model, "layer1", device="cpu").fit(X, np.arange(120) % 3)
    split_dir = tmp_path_factory.mktemp("split")
    save_split(*det.export_split(), split_dir, torch.from_numpy(X[:4]), formats=("pt2",), preprocessing=PRE)
    bare = tmp_path_factory.mktemp("bare")  # the same split without its preprocessing
    save_split(*det.export_split(), bare, torch.from_numpy(X[:4]), formats=("pt2",))
    with uvicorn_running(create_cloud_app(split_dir)) as url, uvicorn_running(create_cloud_app(bare)) as bare_url:
        yield {"model": model, "det": det, "dir": split_dir, "bare": bare, "urls": {"split": url, "bare": bare_url}}


def headers(directory, encoding):
    version = json.loads((directory / "split.json").read_text())["version"]
    return {"X-Earlin-Version": version, "X-Earlin-Encoding": encoding}


def test_png_round_trip_is_exact():
    image = camera_images(1)[0]
    x = decode_image(encode_image(image, "png"), "png", SHAPE, PRE)
    np.testing.assert_array_equal(x[0], preprocess(image, SHAPE, PRE))


def test_runner_uploads_camera_images_and_gets_the_models_answers(served, tmp_path):
    images = camera_images(30, seed=5)
    with torch.no_grad():
        full = served["model"](torch.from_numpy(np.stack([preprocess(im, SHAPE, PRE) for im in images]))).argmax(1).numpy()
    for encoding in ("png", "jpeg"):
        with EdgeRunner(served["dir"], served["urls"]["split"], encoding=encoding) as runner:
            records = runner.run(images, log=tmp_path / f"{encoding}.jsonl")
        uploaded = [r for r in records if r.uploaded]
        assert uploaded and all(r.uploaded == "raw" and r.status == "ok" for r in uploaded)
        agree = np.mean([r.prediction == full[r.index] for r in uploaded])
        if encoding == "png":
            assert agree == 1.0  # lossless: exactly the in-process model
            assert all(r.bytes_sent < images[0].nbytes * 4 for r in uploaded)  # a file, not a float32 tensor
        else:
            assert agree >= 0.9, agree


def _png_header(width, height, crc_ok=True):
    """A PNG signature and IHDR chunk declaring ``width`` x ``height`` (a decompression bomb's header)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    crc = zlib.crc32(b"IHDR" + ihdr) ^ (0 if crc_ok else 1)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", crc)


@pytest.mark.parametrize("case", ["garbage", "truncated", "wrong size", "gif", "format mismatch", "batch 2",
                                  "bomb header", "bad checksum"])
def test_bad_image_files_get_a_4xx(served, case):
    image = camera_images(1)[0]
    h = headers(served["dir"], "png")
    body = encode_image(image, "png")
    if case == "garbage":
        body = b"\x89PNG\r\n\x1a\n" + b"\0" * 50
    elif case == "truncated":
        body = body[: len(body) // 2]
    elif case == "wrong size":
        body = encode_image(np.zeros((20, 20, 3), np.uint8), "png")
    elif case == "gif":
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="GIF")
        body = buffer.getvalue()
    elif case == "format mismatch":
        body = encode_image(image, "jpeg")
    elif case == "bomb header":  # 400 million pixels declared: Pillow raises DecompressionBombError on open
        body = _png_header(20000, 20000) + body[33:]
    elif case == "bad checksum":  # Pillow raises SyntaxError ("broken PNG file")
        body = _png_header(32, 32, crc_ok=False) + body[33:]
    else:
        h["X-Earlin-Batch"] = "2"
    r = httpx.post(served["urls"]["split"] + "/v1/raw", content=body, headers=h)
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["detail"]


def test_images_need_the_splits_preprocessing(served):
    r = httpx.post(served["urls"]["bare"] + "/v1/raw", content=encode_image(camera_images(1)[0], "png"),
                   headers=headers(served["bare"], "png"))
    assert r.status_code == 415 and "preprocessing" in r.json()["detail"]
    r = httpx.post(served["urls"]["split"] + "/v1/activations", content=b"x", headers=headers(served["dir"], "png"))
    assert r.status_code == 415  # activations are tensors, never image files
    with pytest.raises(ValueError, match="preprocessing"):
        EdgeRunner(served["bare"], served["urls"]["bare"], encoding="png")


def test_read_inputs_keeps_camera_pixels_for_image_uploads(tmp_path):
    from earlin_sklearn.edge import read_inputs

    images = camera_images(4)
    np.savez(tmp_path / "cam.npz", x=images, y=np.arange(4))
    x, y = read_inputs(tmp_path / "cam.npz")
    assert x.dtype == np.uint8 and x.shape == (4, 12, 12, 3) and y.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "int.npz", x=images.astype(np.int32))
    with pytest.raises(ValueError, match="int32"):
        read_inputs(tmp_path / "int.npz")
