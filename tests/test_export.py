import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from earlin_sklearn import ShallowFeatureOODDetector, save_split
from earlin_sklearn.models import cifar_resnet

from .conftest import EDGE_RTOL, make_images, make_tiny_cnn

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A ResNet-20 cut inside a residual block (two tensors cross), exported once."""
    torch.manual_seed(0)
    model = cifar_resnet(20)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, 32, 32, generator=g)
    y = torch.arange(64) % 4
    det = ShallowFeatureOODDetector(model, "layer1.1.relu1", n_channels=12, device="cpu").fit(X, y)
    edge, cloud = det.export_split()
    directory = tmp_path_factory.mktemp("split")
    paths = save_split(edge, cloud, directory, X[:4])
    X_test = torch.cat([torch.randn(20, 3, 32, 32, generator=g), 3 * torch.randn(20, 3, 32, 32, generator=g)])
    return model, det, edge, cloud, paths, X_test


def test_files_and_manifest(exported):
    *_, paths, _ = exported
    assert {"edge.pt2", "cloud.pt2", "edge.onnx", "cloud.onnx", "manifest"} <= set(paths)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["input_shape"] == [3, 32, 32]
    assert [p["shape"] for p in manifest["payload"]] == [[16, 32, 32], [16, 32, 32]]
    assert len(manifest["version"]) == 64 and set(manifest["files"]) == {"edge.pt2", "cloud.pt2", "edge.onnx", "cloud.onnx"}


def test_onnx_parity(exported):
    model, det, edge, cloud, paths, X = exported
    edge_s = ort.InferenceSession(str(paths["edge.onnx"]))
    cloud_s = ort.InferenceSession(str(paths["cloud.onnx"]))
    is_id, score, *payload = edge_s.run(None, {"x": X.numpy()})  # batch of 40: the batch size is dynamic
    # float32 ONNX convolutions; the power transform stretches far-OOD scores (-1000s): relative there
    np.testing.assert_allclose(score, det.score_samples(X), atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(is_id, det.predict(X) == 1)
    assert 0 < is_id.sum() < len(X)  # both decisions occur
    logits = cloud_s.run(None, dict(zip([i.name for i in cloud_s.get_inputs()], payload)))[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(X).numpy(), atol=1e-4, rtol=1e-4)


def test_pt2_parity(exported):
    model, det, *_, paths, X = exported
    edge = torch.export.load(paths["edge.pt2"]).module()
    cloud = torch.export.load(paths["cloud.pt2"]).module()
    with torch.no_grad():
        is_id, score, *payload = edge(X)
        torch.testing.assert_close(cloud(*payload), model(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score.numpy(), det.score_samples(X), rtol=EDGE_RTOL, atol=EDGE_RTOL)
    np.testing.assert_array_equal(is_id.numpy(), det.predict(X) == 1)


def test_a_cut_across_a_skip_connection_loads_as_users_load_it(exported):
    """load_split's checks accept the cloud.pt2 of a cut with two crossing tensors (its one guard: both have the
    same batch size) and run it; before, its guards_code was refused and such a split could not be served."""
    from earlin_sklearn import load_split

    model, *_, paths, X = exported
    edge, cloud = load_split(paths["manifest"].parent, as_split=True)
    with torch.no_grad():
        out = edge(X)
        assert isinstance(out.payload, tuple) and len(out.payload) == 2
        torch.testing.assert_close(cloud(out.payload), model(X), rtol=1e-5, atol=1e-5)
        with pytest.raises(AssertionError, match="Guard failed"):  # the guard itself, as torch runs it
            cloud(out.payload[0], out.payload[1][:3])


BLOCKED_RUN = """
import importlib.abc, importlib.machinery, sys
BLOCKED = ('sklearn', 'earlin_sklearn', 'scipy')
class Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError('blocked: ' + spec.name)
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    # found (torch probes optional packages with find_spec), but importing fails
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Refuse())
sys.meta_path.insert(0, Block())
try:
    import sklearn
    raise SystemExit('the block does not work')
except ImportError:
    pass
import numpy as np, torch
edge = torch.export.load(sys.argv[1]).module()
x = torch.from_numpy(np.load(sys.argv[2]))
is_id, score, *payload = edge(x)
np.save(sys.argv[3], score.numpy())
assert 'sklearn' not in sys.modules and 'earlin_sklearn' not in sys.modules
print('ran without scikit-learn')
"""


def test_edge_artifact_runs_without_scikit_learn(exported, tmp_path):
    _, det, *_, paths, X = exported
    np.save(tmp_path / "x.npy", X.numpy())
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(paths["edge.pt2"]), str(tmp_path / "x.npy"), str(tmp_path / "s.npy")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ran without scikit-learn" in result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), det.score_samples(X), rtol=EDGE_RTOL, atol=EDGE_RTOL)


def test_bad_format(exported, tmp_path):
    _, _, edge, cloud, _, X = exported
    with pytest.raises(ValueError, match="formats"):
        save_split(edge, cloud, tmp_path, X[:2], formats=("tflite",))


def test_pt2_holds_the_example_not_its_base_tensor(tmp_path):
    """The example is often a slice of the test set: the archive stores that slice, not the whole set."""
    X, y = make_images(60)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y)
    big = torch.randn(4000, 3, 12, 12)  # 6.9 MB; two of its images are the example
    paths = save_split(*det.export_split(), tmp_path, big[:2], formats=("pt2",))
    assert paths["edge.pt2"].stat().st_size < 1_000_000
