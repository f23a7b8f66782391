"""The edge part in device formats: ExecuTorch programs and int8 ONNX, loaded and run in their runtimes,
and the device side (earlin_sklearn.edge) in a process that never imports torch or scikit-learn."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchvision
from scipy.stats import spearmanr

ort = pytest.importorskip("onnxruntime")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from earlin_sklearn import ShallowFeatureOODDetector, save_split  # noqa: E402
from earlin_sklearn._server import create_cloud_app  # noqa: E402
from earlin_sklearn.edge import load_edge_program, read_manifest  # noqa: E402
from earlin_sklearn.edge._executorch import executorch_root  # noqa: E402
from earlin_sklearn.exceptions import SplitVerificationError  # noqa: E402

from .conftest import make_images, make_tiny_cnn, uvicorn_running  # noqa: E402

try:
    executorch_root()
    HAS_EXECUTORCH = True
except ImportError:
    HAS_EXECUTORCH = False
needs_executorch = pytest.mark.skipif(not HAS_EXECUTORCH, reason="executorch is not installed")

# A process that may import numpy, onnxruntime, httpx, Pillow and earlin_sklearn.edge, and fails the moment
# anything imports torch, torchvision, scikit-learn or SciPy (the device has none of them).
NO_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("torch", "torchvision", "sklearn", "scipy", "torchao")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"the device side imported {name}")
    sys.meta_path.insert(0, Block())
""")


def stream(n_id=30, n_ood=20, size=12):
    X_id, _ = make_images(n_id, seed=11, size=size)
    X_ood = np.random.default_rng(5).uniform(-3, 3, size=(n_ood, 3, size, size)).astype(np.float32)
    return np.concatenate([X_id, X_ood])


@pytest.fixture(scope="module")
def device_split(tmp_path_factory):
    """The tiny CNN's split in every format, int8 calibrated on ID images and thresholded on held-out ones."""
    model = make_tiny_cnn()
    X, y = make_images(240)
    det = ShallowFeatureOODDetector(model, "layer1", device="cpu").fit(X[:120], y[:120])
    formats = ("pt2", "onnx", "onnx-int8") + (("pte", "pte-int8") if HAS_EXECUTORCH else ())
    folder = tmp_path_factory.mktemp("device_split")
    save_split(*det.export_split(), folder, torch.from_numpy(X[:2]), formats=formats,
               calibration=X[120:180], threshold_data=X[180:])
    return {"det": det, "dir": folder, "model": model, "formats": formats}


def test_every_file_is_sealed_and_described(device_split):
    manifest = read_manifest(device_split["dir"])
    names = {"edge.pt2", "cloud.pt2", "edge.onnx", "cloud.onnx", "edge.int8.onnx"}
    if HAS_EXECUTORCH:
        names |= {"edge.pte", "edge.int8.pte"}
    on_disk = {p.name for p in device_split["dir"].iterdir()} - {"split.json"}
    assert set(manifest["files"]) == names == on_disk  # nothing unsealed: the ONNX weights are inside the files
    programs = manifest["edge_programs"]
    assert {programs[n]["precision"] for n in programs} == {"float32", "int8"}
    for name, info in programs.items():
        if info["precision"] == "int8":
            assert info["threshold_images"] == 60 and info["quantization_images"] == 60
            assert info["threshold_rule"].startswith("match") and "held-out" in info["threshold_rule"]
            assert info["bias_correction"].startswith("mean")
        else:
            assert info["offset"] == manifest["offset"] == device_split["det"].offset_


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("executorch", marks=needs_executorch)])
def test_float_programs_decide_as_the_detector(device_split, runtime):
    det, X = device_split["det"], stream()
    _, program = load_edge_program(device_split["dir"], runtime, "float32")
    is_id, score, payload = program(X)
    np.testing.assert_allclose(score, det.score_samples(X), rtol=1e-4)  # float32 convolutions of another library
    np.testing.assert_array_equal(is_id, det.predict(X) == 1)
    assert 0 < is_id.sum() < len(X)
    with torch.no_grad():
        expected = device_split["model"](torch.from_numpy(X))
    cloud = torch.export.load(device_split["dir"] / "cloud.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(cloud(*[torch.from_numpy(p) for p in payload]), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("executorch", marks=needs_executorch)])
def test_int8_programs_agree_with_the_float_detector_and_keep_their_tpr(device_split, runtime):
    det, X = device_split["det"], stream(n_id=60, n_ood=40)
    manifest, program = load_edge_program(device_split["dir"], runtime, "int8")
    assert program.precision == "int8" and program.offset == manifest["edge_programs"][program.name]["offset"]
    is_id, score, payload = program(X)
    np.testing.assert_array_equal(is_id, score >= program.offset)  # the program's own threshold decides
    assert np.mean(is_id == (det.predict(X) == 1)) >= 0.95
    assert spearmanr(score, det.score_samples(X)).statistic > 0.9  # ranks: far-OOD scores are in the 1000s
    X_held, _ = make_images(200, seed=3)  # new ID images: the int8 threshold accepts about as many as the float one
    assert abs(program(X_held)[0].mean() - np.mean(det.predict(X_held) == 1)) <= 0.06
    with torch.no_grad():  # the cloud part classifies the int8 edge's payloads as it does the float ones
        cloud = torch.export.load(device_split["dir"] / "cloud.pt2").module()
        ref = device_split["model"](torch.from_numpy(X_held)).argmax(1)
        got = cloud(*[torch.from_numpy(p) for p in program(X_held)[2]]).argmax(1)
    assert (got == ref).float().mean() >= 0.9


@needs_executorch
def test_programs_read_inputs_in_any_memory_layout(device_split):
    """A program keeps the dim order of its export example: inputs of any layout are made contiguous first."""
    X = stream()
    _, program = load_edge_program(device_split["dir"], "executorch", "float32")
    channels_last = torch.from_numpy(X).contiguous(memory_format=torch.channels_last).numpy()
    assert not channels_last.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(program(channels_last)[1], program(X)[1])


def test_an_edited_program_is_refused(device_split, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(device_split["dir"], folder)
    data = bytearray((folder / "edge.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "edge.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(SplitVerificationError, match="does not match its sha256"):
        load_edge_program(folder, "onnxruntime", "int8")
    load_edge_program(folder, "onnxruntime", "float32")  # the untouched files still load


@pytest.mark.skipif(not HAS_EXECUTORCH, reason="needs executorch")
def test_a_malformed_program_in_an_unsigned_split_is_refused(device_split, tmp_path):
    """A .pte cut short, re-hashed into an unsigned manifest: ExecuTorch's flatbuffer verification refuses it at
    load (its offsets point outside the bytes), as a SplitVerificationError."""
    import hashlib
    import json
    import shutil

    from earlin_sklearn.edge._manifest import seal

    folder = tmp_path / "copy"
    shutil.copytree(device_split["dir"], folder)
    data = (folder / "edge.pte").read_bytes()
    (folder / "edge.pte").write_bytes(data[: len(data) // 2])
    manifest = json.loads((folder / "split.json").read_text())
    manifest["files"]["edge.pte"] = hashlib.sha256(data[: len(data) // 2]).hexdigest()
    manifest = seal({k: v for k, v in manifest.items() if k not in ("version", "signature")})
    (folder / "split.json").write_text(json.dumps(manifest))
    with pytest.raises(SplitVerificationError, match="edge.pte"):
        load_edge_program(folder, "executorch", "float32")


def test_auto_choice_and_clear_errors(device_split):
    manifest = read_manifest(device_split["dir"])
    _, program = load_edge_program(device_split["dir"])
    assert program.precision == "int8" and program.runtime == ("executorch" if HAS_EXECUTORCH else "onnxruntime")
    with pytest.raises(ValueError, match="runtime must be"):
        load_edge_program(device_split["dir"], runtime="tflite")
    manifest["edge_programs"] = {k: v for k, v in manifest["edge_programs"].items() if v["precision"] == "float32"}
    from earlin_sklearn.edge import choose_program

    with pytest.raises(ValueError, match="no edge program for runtime='onnxruntime', precision='int8'"):
        choose_program(manifest, "onnxruntime", "int8")


def test_int8_formats_need_id_calibration_images(tmp_path):
    X, y = make_images(60)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="calibration=ID inputs"):
        save_split(*det.export_split(), tmp_path, torch.from_numpy(X[:2]), formats=("onnx-int8",))
    with pytest.raises(ValueError, match="pass threshold_data"):  # a TPR of its own needs held-out ID images
        save_split(*det.export_split(), tmp_path, torch.from_numpy(X[:2]), formats=("onnx-int8",),
                   calibration=X[:30], int8_threshold="target_tpr")
    with pytest.raises(ValueError, match="int8_threshold must be one of"):
        save_split(*det.export_split(), tmp_path, torch.from_numpy(X[:2]), formats=("onnx-int8",),
                   calibration=X[:30], int8_threshold="tpr")


def test_the_target_tpr_rule_sets_an_int8_threshold_of_its_own(device_split, tmp_path):
    det, X = device_split["det"], make_images(240)[0]
    save_split(*det.export_split(), tmp_path, torch.from_numpy(X[:2]), formats=("onnx-int8",),
               calibration=X[120:180], threshold_data=X[180:], int8_threshold="target_tpr")
    manifest, program = load_edge_program(tmp_path, "onnxruntime", "int8")
    assert manifest["edge_programs"]["edge.int8.onnx"]["threshold_rule"] == "target_tpr on held-out ID images"
    accepted = program(X[180:])[0].mean()  # the threshold's own images: target_tpr of them, to one image
    assert abs(accepted - det.target_tpr) <= 1 / 60 + 1e-9


@pytest.mark.parametrize("params", [{}, {"gaussianize": None}, {"gaussianize": None, "metric": "cosine"}],
                         ids=["yeo-johnson", "raw", "cosine"])
def test_a_shift_of_the_pooled_features_is_folded_into_the_head_exactly(params):
    X, y = make_images(120)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu", **params).fit(X, y)
    edge, _ = det.export_split()
    with torch.no_grad():
        pooled = edge.pooled(edge.taps_and_crossing(torch.from_numpy(X[:20]))[0])
        shift = 0.05 * torch.randn(pooled.shape[1], generator=torch.Generator().manual_seed(0)) * pooled.std(0)
        shifted = edge.head.shifted(shift.numpy())
        torch.testing.assert_close(shifted(pooled), edge.head(pooled + shift), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(shifted(pooled), edge.head(pooled))  # the shift moved the scores
        torch.testing.assert_close(edge.head.shifted(np.zeros(pooled.shape[1]))(pooled), edge.head(pooled))
    assert len(list(shifted.buffers())) == len(list(edge.head.buffers()))  # no new operation, no new buffer
    with pytest.raises(ValueError, match="shift has 3 values"):
        edge.head.shifted(np.zeros(3))


def test_int8_onnx_edges_carry_the_calibration_bias_in_their_head():
    """The int8 ONNX edge's head is shifted by the mean gap between the float and ONNX Runtime's int8 pooled
    features on the calibration images: quantization without the correction, then the correction, by hand."""
    from earlin_sklearn._device_formats import (FlatEdge, int8_onnx, int8_onnx_edge, onnx_program,
                                                pooled_features)
    from onnx import numpy_helper

    X, y = make_images(200)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X[:120], y[:120])
    edge, _ = det.export_split()
    calibration = torch.from_numpy(X[120:180])
    outputs = ["is_id", "score", "payload_0", "pooled"]
    model = onnx_program(FlatEdge(edge, pooled=True).eval(), (torch.from_numpy(X[:2]),), ["x"], outputs,
                         ({0: torch.export.Dim("batch", min=1)},))
    corrected = int8_onnx_edge(edge, model, calibration)
    assert [o.name for o in corrected.graph.output] == outputs[:3]  # the pooled output is gone
    plain = ort.InferenceSession(int8_onnx(model, calibration).SerializeToString(), providers=["CPUExecutionProvider"])
    got = plain.run(None, {"x": calibration.numpy()})[-1]
    bias = (pooled_features(edge, calibration) - got).mean(axis=0)
    assert np.abs(bias).max() > 0  # int8 moved the features
    one = {i.name: numpy_helper.to_array(i) for i in corrected.graph.initializer}["edge.head.one"]
    np.testing.assert_allclose(one, 1.0 + edge.head.side.numpy() * bias, rtol=1e-6)
    # and the program scores the int8 features as the float head scores them once shifted back
    session = ort.InferenceSession(corrected.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = edge.head(torch.from_numpy(got) + torch.from_numpy(bias)).numpy()
    np.testing.assert_allclose(session.run(None, {"x": calibration.numpy()})[1], expected, rtol=1e-4)


@needs_executorch
def test_int8_pte_edges_carry_the_calibration_bias_in_their_head():
    from earlin_sklearn._device_formats import FlatEdge, executorch_program, int8_edge, pooled_features
    from earlin_sklearn.edge._programs import EdgeProgram

    X, y = make_images(200)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X[:120], y[:120])
    edge, _ = det.export_split()
    calibration, example = torch.from_numpy(X[120:150]), torch.from_numpy(X[:2])
    plain = int8_edge(edge, calibration, example, correct_bias=False)
    corrected = int8_edge(edge, calibration, example)  # the same ranges: min-max observers on the same images
    # the head is the float program's (float32 whitening, XNNPACK-delegated), not a float64 copy twice its bytes
    assert corrected.head.projection.dtype == edge.head.projection.dtype == torch.float32

    lowered = EdgeProgram("p.pte", {"runtime": "executorch", "batch": 1},
                          executorch_program(FlatEdge(plain, pooled=True), example))
    got = torch.from_numpy(lowered(calibration.numpy())[2][-1])  # what XNNPACK's int8 kernels pool
    with torch.no_grad():
        bias = torch.from_numpy(pooled_features(edge, calibration) - got.double().numpy()).mean(0)
        assert bias.abs().max() > 0
        torch.testing.assert_close(corrected.head(got), plain.head(got + bias), rtol=1e-9, atol=1e-9)


# torchvision prefixes with random weights: a .pte (float) and an int8 ONNX edge load, run and decide as the
# exported edge module does (64x64 inputs keep the lowering fast)
TORCHVISION = [("resnet18", "layer1"), ("mobilenet_v3_small", "features.2"), ("shufflenet_v2_x0_5", "stage2")]


@pytest.mark.parametrize("name, layer", TORCHVISION)
def test_torchvision_prefixes_in_device_formats(name, layer, tmp_path):
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    g = torch.Generator().manual_seed(0)
    X = torch.rand(48, 3, 64, 64, generator=g)
    det = ShallowFeatureOODDetector(net, layer, device="cpu").fit(X[:32], np.arange(32) % 2)
    edge, cloud = det.export_split()
    formats = ("onnx", "onnx-int8") + (("pte",) if HAS_EXECUTORCH else ())
    save_split(edge, cloud, tmp_path, X[:2], formats=formats, calibration=X[32:])
    probe = torch.cat([X[:8], 3 * torch.rand(8, 3, 64, 64, generator=g)])
    with torch.no_grad():
        out = edge(probe)
    for runtime, precision in [("onnxruntime", "float32"), ("onnxruntime", "int8")] + (
            [("executorch", "float32")] if HAS_EXECUTORCH else []):
        _, program = load_edge_program(tmp_path, runtime, precision)
        is_id, score, payload = program(probe.numpy())
        assert np.isfinite(score).all() and payload[0].shape == tuple(out.payload.shape)
        if precision == "float32":
            np.testing.assert_allclose(payload[0], out.payload.numpy(), rtol=1e-3, atol=1e-3)
        # Random weights give pooled features that are constant to ~1e-7 of their value; standardized, they
        # turn another library's float32 rounding into score changes (conftest.RANDOM_MODEL_RTOL), so scores
        # are compared where it matters: the ID-like inputs stay apart from the others, decisions agree.
        assert score[:8].min() > score[8:].max() and np.mean(is_id == out.is_id.numpy()) >= 0.875


@pytest.fixture(scope="module")
def served(device_split):
    with uvicorn_running(create_cloud_app(device_split["dir"]), log_level="warning") as url:
        yield url


RUN_EDGE = NO_TORCH + textwrap.dedent("""
    import json
    from earlin_sklearn.__main__ import main
    code = main(["run-edge", sys.argv[1], "--url", sys.argv[2], "--input", sys.argv[3], "--log", sys.argv[4],
                 "--runtime", sys.argv[5], "--precision", sys.argv[6], "--upload", "activations"])
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sklearn", "scipy"))
    print(json.dumps({"code": code, "heavy": heavy}))
""")


@pytest.mark.parametrize("runtime, precision", [
    ("onnxruntime", "float32"), ("onnxruntime", "int8"),
    pytest.param("executorch", "float32", marks=needs_executorch),
    pytest.param("executorch", "int8", marks=needs_executorch)])
def test_run_edge_without_torch_or_sklearn(device_split, served, runtime, precision, tmp_path):
    """`earlin run-edge` in a process where importing torch or scikit-learn fails: the float programs decide as
    the torch path does, and every accepted input gets the cloud's answer."""
    X = stream()
    np.savez(tmp_path / "stream.npz", x=X)
    env = {**os.environ, "EARLIN_CACHE_DIR": os.environ.get("EARLIN_CACHE_DIR", str(tmp_path / "cache"))}
    done = subprocess.run([sys.executable, "-c", RUN_EDGE, str(device_split["dir"]), served, str(tmp_path / "stream.npz"),
                           str(tmp_path / "log.jsonl"), runtime, precision], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(records) == len(X) and all(r["status"] == "ok" for r in records)
    is_id = np.array([r["is_id"] for r in records])
    _, program = load_edge_program(device_split["dir"], runtime, precision)
    np.testing.assert_array_equal(is_id, program(X)[0])
    if precision == "float32":
        np.testing.assert_array_equal(is_id, device_split["det"].predict(X) == 1)
    with torch.no_grad():
        full = device_split["model"](torch.from_numpy(X)).argmax(1).numpy()
    uploaded = [r for r in records if r["is_id"]]
    assert uploaded and np.mean([r["prediction"] == full[r["index"]] for r in uploaded]) >= 0.9


def test_onnx_head_buffers_are_set_only_with_their_own_shape():
    from onnx import numpy_helper

    from earlin_sklearn._device_formats import FlatEdge, onnx_program, set_onnx_buffers

    X, y = make_images(60)
    edge, _ = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y).export_split()
    model = onnx_program(FlatEdge(edge).eval(), (torch.from_numpy(X[:2]),), ["x"], None, None)
    one = edge.head.one.numpy() + 0.5
    set_onnx_buffers(model, {"one": one})
    np.testing.assert_array_equal(
        {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}["edge.head.one"], one)
    with pytest.raises(ValueError, match="edge.head.one has shape"):
        set_onnx_buffers(model, {"one": one[:1]})
    with pytest.raises(RuntimeError, match="no initializer 'edge.head.nothing'"):
        set_onnx_buffers(model, {"nothing": 0.0})

