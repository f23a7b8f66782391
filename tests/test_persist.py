"""save_detector / load_detector: JSON + safetensors, nothing executed on loading, weights verified."""

import json

import numpy as np
import pytest
import torch

from earlin_sklearn import BackboneFeatures, ShallowFeatureOODDetector, load_detector, save_detector
from earlin_sklearn.baselines import EnergyKNNDetector, KNNDetector, LogitDetector
from earlin_sklearn._export import seal
from earlin_sklearn.models import cifar_resnet

pytest.importorskip("safetensors")


def _data(n=60):
    X = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    return X, np.arange(n) % 3


@pytest.mark.parametrize("make", [
    lambda net: ShallowFeatureOODDetector(net, "layer1", device="cpu"),
    lambda net: ShallowFeatureOODDetector(net, "layer1", gaussianize=None, n_channels=0.5, device="cpu"),
    lambda net: BackboneFeatures(net, "layer1.1", device="cpu"),
    lambda net: LogitDetector(net, "energy", device="cpu"),
    lambda net: EnergyKNNDetector(net, k=5, device="cpu"),
], ids=["default", "plain", "features", "logits", "energy+knn"])
def test_round_trip_is_exact(make, tmp_path):
    X, y = _data()
    est = make(cifar_resnet(20)).fit(X, y)
    save_detector(est, tmp_path / "det")
    loaded = load_detector(tmp_path / "det", cifar_resnet(20))  # an untrained architecture: weights come from the file
    out = (lambda e: e.transform(X)) if isinstance(est, BackboneFeatures) else (lambda e: e.score_samples(X))
    np.testing.assert_array_equal(out(loaded), out(est))
    if isinstance(est, ShallowFeatureOODDetector):
        np.testing.assert_array_equal(loaded.predict(X), est.predict(X))
        edge, _ = loaded.export_split()
        np.testing.assert_allclose(edge(torch.as_tensor(X[:4])).score.numpy(), est.score_samples(X[:4]), rtol=1e-6)


def test_string_labels_round_trip(tmp_path):
    X, y = _data()
    labels = np.array(["cat", "dog", "eel"])[y]
    det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, labels)
    save_detector(det, tmp_path / "d")
    loaded = load_detector(tmp_path / "d", cifar_resnet(20))
    assert loaded.pipeline_["distance"].classes_.tolist() == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))


def test_without_weights_the_backbone_must_hold_the_fitted_ones(tmp_path):
    X, y = _data()
    torch.manual_seed(0)
    net = cifar_resnet(20)
    det = ShallowFeatureOODDetector(net, "layer1", device="cpu").fit(X, y)
    save_detector(det, tmp_path / "d", include_weights=False)
    statistics = det.moments_.sample_rows.nbytes + det.moments_.scatter.nbytes
    # the backbone (1.1 MB) is not in it: only the fitted statistics and 200 kB of other arrays
    assert (tmp_path / "d" / "tensors.safetensors").stat().st_size < statistics + 200_000
    loaded = load_detector(tmp_path / "d", net)
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="not the ones the detector was fitted with"):
        load_detector(tmp_path / "d", cifar_resnet(20))


def test_tampered_or_foreign_files_are_refused(tmp_path):
    X, y = _data()
    det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, y)
    save_detector(det, tmp_path / "d")
    tensors = tmp_path / "d" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 1
    tensors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_detector(tmp_path / "d", cifar_resnet(20))
    save_detector(det, tmp_path / "d")
    with pytest.raises(ValueError, match="do not fit this backbone"):
        load_detector(tmp_path / "d", cifar_resnet(56))
    # a class name that is not on the allow-list is refused, never imported
    doc_path = tmp_path / "d" / "estimator.json"
    doc = json.loads(doc_path.read_text())
    doc["estimator"]["__estimator__"] = "os.system"
    doc_path.write_text(json.dumps(seal(doc)))  # an attacker who can write the file can also re-seal it
    with pytest.raises(ValueError, match="not an estimator this loader rebuilds"):
        load_detector(tmp_path / "d", cifar_resnet(20))


def test_estimators_without_a_backbone_are_pointed_to_joblib(tmp_path):
    X, _ = _data()
    knn = KNNDetector().fit(X.reshape(len(X), -1)[:, :20])
    with pytest.raises(TypeError, match="joblib"):
        save_detector(knn, tmp_path / "k")


def test_the_json_is_verified_and_can_be_signed(tmp_path):
    X, y = _data()
    det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, y)
    key = b"owner key, 16+ bytes"
    save_detector(det, tmp_path / "d", key=key)
    load_detector(tmp_path / "d", cifar_resnet(20), key=key)
    with pytest.raises(ValueError, match="signed with another key"):
        load_detector(tmp_path / "d", cifar_resnet(20), key=b"another key, 16+ bytes")
    # a threshold edited in the JSON (the tensors untouched) is refused, with or without a key
    doc_path = tmp_path / "d" / "estimator.json"
    text = doc_path.read_text()
    doc = json.loads(text)
    doc["estimator"]["state"]["target_tpr"] = 0.5
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="modified after save_detector wrote it"):
        load_detector(tmp_path / "d", cifar_resnet(20))


def _crafted_folders(tmp_path):
    """Detector folders an attacker or a bad disk could leave (resealed without the key): name -> folder."""
    import hashlib
    import os
    import shutil

    from safetensors.numpy import load as load_arrays
    from safetensors.numpy import save as save_arrays

    from .conftest import make_images, make_tiny_cnn

    X, y = make_images(60)
    good = save_detector(ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y), tmp_path / "good")
    doc = json.loads((good / "estimator.json").read_text())
    folders = {}

    def variant(name, document=None, raw=None, tensors=None):
        folder = tmp_path / name.replace(" ", "_")
        shutil.copytree(good, folder)
        if tensors is not None:
            blob = save_arrays(tensors)
            (folder / "tensors.safetensors").write_bytes(blob)
            document = dict(document or doc, tensors_sha256=hashlib.sha256(blob).hexdigest())
        if document is not None:
            document = {k: v for k, v in document.items() if k not in ("version", "signature")}
            raw = json.dumps(seal(document), allow_nan=True)
        if raw is not None:
            (folder / "estimator.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
        folders[name] = folder
        return folder

    def replace_key(tree, key, value):
        if isinstance(tree, dict):
            return {k: value if k == key else replace_key(v, key, value) for k, v in tree.items()}
        if isinstance(tree, list):
            return [replace_key(v, key, value) for v in tree]
        return tree

    variant("offset -Infinity", replace_key(doc, "offset_", float("-inf")))
    variant("offset NaN", replace_key(doc, "offset_", float("nan")))
    variant("not JSON", raw=b"{not json")
    variant("not UTF-8", raw=b"\xff\xfe{}")
    variant("deep nesting", raw="[" * 100_000 + "]" * 100_000)
    variant("a list", raw="[]")
    variant("missing field", {k: v for k, v in doc.items() if k != "includes_weights"})
    variant("unknown entry", dict(doc, estimator={"__nope__": 1}))
    arrays = load_arrays((good / "tensors.safetensors").read_bytes())
    centroids = next(k for k in arrays if k.endswith(".centroids_"))
    whitening = next(k for k in arrays if k.endswith(".whitening_"))
    variant("a missing array", tensors={k: v for k, v in arrays.items() if k != centroids})
    variant("inconsistent arrays", tensors={**arrays, whitening: np.ascontiguousarray(arrays[whitening][:, :1])})
    variant("inconsistent centroids", tensors={**arrays, centroids: np.ascontiguousarray(arrays[centroids][:, :3])})
    variant("non-finite centroids", tensors={**arrays, centroids: np.full_like(arrays[centroids], np.inf)})
    folder = variant("tensors not safetensors", dict(doc, tensors_sha256=hashlib.sha256(b"garbage" * 10).hexdigest()))
    (folder / "tensors.safetensors").write_bytes(b"garbage" * 10)
    folder = variant("estimator.json a link to /dev/zero")
    (folder / "estimator.json").unlink()
    (folder / "estimator.json").symlink_to("/dev/zero")
    folder = variant("estimator.json a FIFO")
    (folder / "estimator.json").unlink()
    os.mkfifo(folder / "estimator.json")
    return good, folders


def test_every_malformed_folder_gets_one_clear_error(tmp_path):
    """Crafted or damaged detector folders: DetectorFileError (a ValueError) naming the problem, within a second,
    never a raw KeyError/RecursionError/UnicodeDecodeError, never a detector that loads and accepts everything."""
    import time

    from earlin_sklearn import DetectorFileError

    from .conftest import make_tiny_cnn

    good, folders = _crafted_folders(tmp_path)
    load_detector(good, make_tiny_cnn())
    for name, folder in folders.items():
        t0 = time.perf_counter()
        with pytest.raises(DetectorFileError) as info:
            load_detector(folder, make_tiny_cnn())
        assert time.perf_counter() - t0 < 5, name
        assert str(info.value), name
        if "finite" in name or "Infinity" in name or "NaN" in name:
            assert "not finite" in str(info.value), (name, str(info.value))
        if "inconsistent" in name:
            assert "disagree on the feature count" in str(info.value), (name, str(info.value))
