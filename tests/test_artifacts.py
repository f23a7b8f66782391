"""Split artifacts that cannot run code when loaded, verified end to end (earlin_sklearn._export)."""

import hashlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import warnings
import zipfile

import numpy as np
import pytest
import torch

from earlin_sklearn import EdgeOutput, ShallowFeatureOODDetector, Split, load_split, save_split
from earlin_sklearn.edge._manifest import canonical as _canonical
from earlin_sklearn.exceptions import SplitVerificationError

from .conftest import make_images, make_tiny_cnn

KEY = b"0123456789abcdef-owner-key"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    X, y = make_images(90)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X, y)
    directory = tmp_path_factory.mktemp("split")
    edge, cloud = det.export_split()
    save_split(edge, cloud, directory, torch.from_numpy(X[:4]), formats=("pt2",), key=KEY,
               preprocessing={"mean": [0.5] * 3, "std": [0.25] * 3})
    other = tmp_path_factory.mktemp("other")  # another model's split, same architecture and cut
    det2 = ShallowFeatureOODDetector(make_tiny_cnn(seed=1), "layer1", device="cpu").fit(X, y)
    save_split(*det2.export_split(), other, torch.from_numpy(X[:4]), formats=("pt2",))
    return {"dir": directory, "other": other, "det": det, "X": torch.from_numpy(X[:8])}


def copy_split(split, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(split["dir"], target)
    return target


def rewrite_manifest(directory, change=None, files=None):
    """What an attacker with write access does: edit the manifest and make its hashes and version agree."""
    path = directory / "split.json"
    manifest = json.loads(path.read_text())
    if change:
        change(manifest)
    for name in files or ():
        manifest["files"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    manifest.pop("signature", None)
    manifest["version"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    path.write_text(json.dumps(manifest))


def rewrite_member(archive_path, suffix, data):
    """Replace the archive member ending with ``suffix`` by ``data`` (a crafted .pt2)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(archive_path) as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data(src.read(info.filename)) if info.filename.endswith(suffix) else src.read(info.filename))
    archive_path.write_bytes(buffer.getvalue())


class _Marker:
    """A pickle that, when loaded, creates a directory: proof that loading ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_round_trip_and_edge_only(split):
    loaded = load_split(split["dir"], key=KEY, as_split=True)
    edge, cloud = loaded  # the shape export_split returns
    exported_edge, exported_cloud = split["det"].export_split()
    x = split["X"]
    out, expected = edge(x), exported_edge(x)
    assert type(out) is type(expected) is EdgeOutput
    np.testing.assert_allclose(out.score.numpy(), split["det"].score_samples(x.numpy()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.score, expected.score, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cloud(out.payload), exported_cloud(expected.payload), rtol=1e-5, atol=1e-5)
    assert cloud(out.payload).shape == (8, 3)
    assert loaded.edge is edge and loaded.cloud is cloud
    assert loaded.manifest["preprocessing"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert loaded.manifest["cut"]["layer"] == "layer1"
    assert loaded.manifest["version"][:12] in repr(loaded)
    edge_only, no_cloud = load_split(split["dir"], parts=("edge",), as_split=True)
    assert edge_only is not None and no_cloud is None
    assert isinstance(split["det"].export_split(), Split) and split["det"].export_split().manifest is None
    assert pickle.loads(pickle.dumps(Split(1, 2, {"version": "v"}))).manifest == {"version": "v"}


def test_the_old_load_split_tuple_warns_and_keeps_its_shape(split):
    with pytest.warns(FutureWarning, match="as_split=True"):
        manifest, edge, cloud = load_split(split["dir"])
    is_id, score, *payload = edge(split["X"])  # the 0.1 flat tuple
    assert cloud(*payload).shape == (8, 3) and manifest["cut"]["layer"] == "layer1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_split(split["dir"], as_split=False)) == 3


def test_pickled_weights_are_refused_without_running_code(split, tmp_path):
    directory = copy_split(split, tmp_path)
    marker = tmp_path / "ran"
    with zipfile.ZipFile(directory / "cloud.pt2") as z:
        names = z.namelist()
    if any(n.endswith("data/weights/weight_0") for n in names):  # torch >= 2.9: one file per tensor + a config
        evil = pickle.dumps(_Marker(marker))
        rewrite_member(directory / "cloud.pt2", "data/weights/weight_0", lambda _: evil)

        def mark_pickled(raw):
            config = json.loads(raw)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            return json.dumps(config).encode()

        rewrite_member(directory / "cloud.pt2", "_weights_config.json", mark_pickled)
        expected = "stored as a pickle"
    else:  # older archives: the state dict is one torch.save file
        buffer = io.BytesIO()
        torch.save(_Marker(marker), buffer)
        rewrite_member(directory / "cloud.pt2", "data/weights/model.pt", lambda _: buffer.getvalue())
        expected = "weights-only"
    rewrite_manifest(directory, files=["cloud.pt2"])
    with pytest.raises(ValueError, match=expected):
        load_split(directory)
    assert not marker.exists()
    # the crafted file is live: torch.export.load itself would have run it
    try:
        torch.export.load(directory / "cloud.pt2")
    except Exception:
        pass
    assert marker.exists()


def test_sample_inputs_that_need_a_full_unpickle_are_refused(split, tmp_path):
    directory = copy_split(split, tmp_path)
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save(_Marker(marker), buffer)
    rewrite_member(directory / "edge.pt2", "data/sample_inputs/model.pt", lambda _: buffer.getvalue())
    rewrite_manifest(directory, files=["edge.pt2"])
    with pytest.raises(ValueError, match="weights-only"):
        load_split(directory, parts=("edge",))
    assert not marker.exists()


def test_unexpected_archive_members_are_refused(split, tmp_path):
    directory = copy_split(split, tmp_path)
    with zipfile.ZipFile(directory / "edge.pt2", "a") as z:
        z.writestr("edge/extra/evil.pkl", pickle.dumps(_Marker(tmp_path / "ran")))
    rewrite_manifest(directory, files=["edge.pt2"])
    with pytest.raises(ValueError, match="unexpected member"):
        load_split(directory)


@pytest.mark.parametrize("tamper", ["swap", "flip", "truncate", "threshold", "missing"])
def test_tampered_files_are_refused(split, tmp_path, tamper):
    directory = copy_split(split, tmp_path)
    if tamper == "swap":  # another model's cloud part dropped into the folder
        shutil.copy(split["other"] / "cloud.pt2", directory / "cloud.pt2")
    elif tamper == "flip":
        data = bytearray((directory / "edge.pt2").read_bytes())
        data[len(data) // 2] ^= 0x01
        (directory / "edge.pt2").write_bytes(bytes(data))
    elif tamper == "truncate":
        data = (directory / "cloud.pt2").read_bytes()
        (directory / "cloud.pt2").write_bytes(data[: len(data) // 2])
    elif tamper == "threshold":
        manifest = json.loads((directory / "split.json").read_text())
        manifest["offset"] += 1.0
        (directory / "split.json").write_text(json.dumps(manifest))
    else:
        (directory / "cloud.pt2").unlink()
    error = FileNotFoundError if tamper == "missing" else ValueError
    with pytest.raises(error, match="sha256|modified|not found"):
        load_split(directory)


def test_signatures(split, tmp_path):
    load_split(split["dir"], key=KEY, as_split=True)
    with pytest.raises(ValueError, match="signed with another key"):
        load_split(split["dir"], key=b"another key of sixteen+ bytes")
    with pytest.raises(ValueError, match="not signed"):
        load_split(split["other"], key=KEY)
    # an attacker who rewrites files and manifest cannot re-sign without the key
    directory = copy_split(split, tmp_path)
    shutil.copy(split["other"] / "cloud.pt2", directory / "cloud.pt2")
    rewrite_manifest(directory, files=["cloud.pt2"])
    load_split(directory, as_split=True)  # consistent, so accepted without a key...
    with pytest.raises(ValueError, match="not signed"):
        load_split(directory, key=KEY)  # ...and refused by a device that holds the owner's key
    with pytest.raises(ValueError, match="at least 16 bytes"):
        load_split(split["dir"], key="short")


def test_version_covers_the_cut(tmp_path):
    X, y = make_images(90)
    model = make_tiny_cnn()
    versions = []
    for layer in ("layer1", "layer1.0"):
        det = ShallowFeatureOODDetector(model, layer, extra_layers=(), device="cpu").fit(X, y)
        save_split(*det.export_split(), tmp_path / layer, torch.from_numpy(X[:4]), formats=("pt2",))
        versions.append(load_split(tmp_path / layer, parts=(), as_split=True).manifest["version"])
    assert versions[0] != versions[1]


def test_old_and_garbage_manifests_are_refused(split, tmp_path):
    directory = copy_split(split, tmp_path)
    manifest = json.loads((directory / "split.json").read_text())
    manifest["format"] = "earlin-split/1"
    (directory / "split.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="Export the split again"):
        load_split(directory)
    (directory / "split.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_split(directory)


def test_the_server_refuses_a_tampered_split(split, tmp_path):
    pytest.importorskip("fastapi")
    from earlin_sklearn._server import create_cloud_app

    directory = copy_split(split, tmp_path)
    shutil.copy(split["other"] / "cloud.pt2", directory / "cloud.pt2")
    with pytest.raises(ValueError, match="sha256"):
        create_cloud_app(directory)
    with pytest.raises(ValueError, match="signed with another key"):
        create_cloud_app(split["dir"], key=b"another key of sixteen+ bytes")


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo", "oversize"])
def test_manifest_reads_are_bounded(split, tmp_path, kind):
    """split.json as a link to an endless device, a FIFO with no writer, or a huge file: refused at once."""
    import os
    import time

    from earlin_sklearn.edge import read_manifest

    directory = copy_split(split, tmp_path)
    manifest = directory / "split.json"
    manifest.unlink()
    if kind == "symlink to /dev/zero":
        manifest.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.write_bytes(b" " * (2 << 20))
    t0 = time.perf_counter()
    with pytest.raises(SplitVerificationError):
        read_manifest(directory)
    with pytest.raises(SplitVerificationError):
        load_split(directory)
    assert time.perf_counter() - t0 < 5


def _edit_model_json(change):
    def edit(raw):
        program = json.loads(raw)
        change(program)
        return json.dumps(program).encode()
    return edit


def _guards(marker):
    def change(program):
        program["guards_code"] = [f"__import__('os').makedirs({str(marker)!r}) is None"]
    return change


def _guard_lookalike(marker):
    def change(program):  # the form of the one guard a split may carry, with code after it
        program["guards_code"] = ["L['x'].size()[0] == L['x'].size()[0] and "
                                  f"__import__('os').makedirs({str(marker)!r}) is None"]
    return change


def _sympify(marker):
    def change(program):
        for meta in program["graph_module"]["graph"]["tensor_values"].values():
            for size in meta["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = f"__import__('os').makedirs({str(marker)!r}) or {size['as_expr']['expr_str']}"
                    return
        raise AssertionError("the edge program has no symbolic size to craft")
    return change


def _arg_names(marker):
    def change(program):
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        signature["forward_arg_names"] = [f"x=__import__('os').makedirs({str(marker)!r})"]
    return change


def _target(marker):
    def change(program):  # torch resolves any torch.* name; torch.os is the os module
        nodes = program["graph_module"]["graph"]["nodes"]
        nodes.insert(0, {"target": "torch.os.makedirs", "inputs": [{"name": "name", "arg": {"as_string": str(marker)},
                         "kind": 1}], "outputs": [{"as_none": True}], "metadata": {}, "name": "evil"})
    return change


def _unknown_field(marker):
    def change(program):
        program["graph_module"]["graph"]["nodes"][0]["extra"] = str(marker)
    return change


@pytest.mark.parametrize("route", ["guards_code", "guard lookalike", "sympify", "forward_arg_names", "node target",
                                   "unknown field"])
def test_code_in_the_program_json_is_refused(split, tmp_path, route):
    """A rewritten model.json (re-hashed, unsigned) that torch would execute: refused by load_split, the edge
    runtime and the server, before torch sees it; no code runs."""
    craft = {"guards_code": _guards, "guard lookalike": _guard_lookalike, "sympify": _sympify,
             "forward_arg_names": _arg_names, "node target": _target, "unknown field": _unknown_field}[route]
    directory = copy_split(split, tmp_path)
    marker = tmp_path / "ran"
    rewrite_member(directory / "edge.pt2", "models/model.json", _edit_model_json(craft(marker)))
    rewrite_manifest(directory, files=["edge.pt2"])
    with pytest.raises(SplitVerificationError, match="model.json"):
        load_split(directory, parts=("edge",))
    from earlin_sklearn.edge import load_edge_program

    with pytest.raises(SplitVerificationError, match="model.json"):
        load_edge_program(directory, runtime="torch")
    if importlib.util.find_spec("fastapi") is not None:
        from earlin_sklearn._server import create_cloud_app

        with pytest.raises(SplitVerificationError, match="model.json"):
            create_cloud_app(directory)
    assert not marker.exists()
    if route in ("guards_code", "guard lookalike", "sympify"):  # the crafted file is live: torch itself runs it
        torch.export.load(directory / "edge.pt2").module()(split["X"][:2])
        assert marker.exists()


def test_zip_tricks_are_refused(split, tmp_path, monkeypatch):
    from earlin_sklearn import _pt2

    directory = copy_split(split, tmp_path)
    original = (directory / "edge.pt2").read_bytes()
    with zipfile.ZipFile(io.BytesIO(original)) as z:
        json_name = next(n for n in z.namelist() if n.endswith("models/model.json"))
        program = z.read(json_name)

    def check(data, match):
        (directory / "edge.pt2").write_bytes(data)
        rewrite_manifest(directory, files=["edge.pt2"])
        with pytest.raises(SplitVerificationError, match=match):
            load_split(directory, parts=("edge",))

    # two members of one name: zipfile reads the last, torch the first
    buffer = io.BytesIO(original)
    with zipfile.ZipFile(buffer, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr(json_name, program)
    check(buffer.getvalue(), "two members of one name")
    # a compressed member (torch.export.save stores every member)
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(original)) as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    check(buffer.getvalue(), "compressed")
    # a JSON member over the bound (whitespace is valid JSON): refused before it is parsed
    monkeypatch.setattr(_pt2, "MAX_JSON_BYTES", len(program) + 10)
    (directory / "edge.pt2").write_bytes(original)
    rewrite_member(directory / "edge.pt2", "models/model.json", lambda raw: raw + b" " * 100)
    check((directory / "edge.pt2").read_bytes(), "over")
    # a duplicate JSON key (parsers disagree on which wins)
    monkeypatch.undo()
    (directory / "edge.pt2").write_bytes(original)
    rewrite_member(directory / "edge.pt2", "models/model.json", lambda raw: b'{"guards_code": [], ' + raw.lstrip()[1:])
    check((directory / "edge.pt2").read_bytes(), "duplicate key")


def test_symbolic_expression_grammar():
    from earlin_sklearn._pt2 import _Refused, check_sym_expr

    for good in ["Symbol('s77', positive=True, integer=True)", "Integer(4)", "3",
                 "Mul(Integer(2), Symbol('s0', positive=True, integer=True))",
                 "FloorDiv(Add(Symbol('s1', integer=True), Integer(-1)), Integer(2))"]:
        check_sym_expr(good)
    for bad in ["__import__('os')", "Symbol('s0').__class__", "Pow(Integer(9), Integer(99999999))",
                "Symbol('x; import os', integer=True)", "Symbol('s0', evaluate=True)", "Integer(1) Integer(2)",
                "Add(" * 40 + "1" + ")" * 40, "lambda: 0", "Integer(1" + "0" * 40 + ")", "S.Infinity"]:
        with pytest.raises(_Refused):
            check_sym_expr(bad)


@pytest.fixture(scope="module")
def onnx_split(split, tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx_split")
    save_split(*split["det"].export_split(), directory, split["X"][:4], formats=("pt2", "onnx"))
    return directory


@pytest.mark.parametrize("edit", ["shape", "dtype", "one payload more", "input shape"])
def test_a_manifest_that_disagrees_with_its_files_is_refused_at_start(onnx_split, tmp_path, edit):
    """Resealed over the same files, a manifest with another cut is refused by load_split, the server and the
    edge runtimes at start (it used to start and answer 500 to every request)."""
    directory = tmp_path / "split"
    shutil.copytree(onnx_split, directory)

    def change(manifest):
        payload = manifest["payload"]
        if edit == "shape":
            payload[0]["shape"] = [payload[0]["shape"][0] + 1, *payload[0]["shape"][1:]]
        elif edit == "dtype":
            payload[0]["dtype"] = "float16"
        elif edit == "one payload more":
            payload.append(dict(payload[0], name="payload_9"))
        else:
            manifest["input_shape"] = [3, 8, 8]

    rewrite_manifest(directory, change)
    with pytest.raises(SplitVerificationError, match="split.json"):
        load_split(directory)
    with pytest.raises(SplitVerificationError, match="split.json"):
        load_split(directory, parts=("edge",) if edit != "dtype" else ("cloud", "edge"))
    from earlin_sklearn.edge import load_edge_program

    with pytest.raises(SplitVerificationError, match="split.json"):
        load_edge_program(directory, runtime="onnxruntime")
    if importlib.util.find_spec("fastapi") is not None:
        from earlin_sklearn._server import create_cloud_app

        with pytest.raises(SplitVerificationError, match="split.json"):
            create_cloud_app(directory)


@pytest.mark.parametrize("name", ["edge.onnx", "cloud.onnx"])
def test_an_onnx_edge_naming_external_data_is_refused(tmp_path, name):
    """An unsigned split whose edge.onnx or cloud.onnx (rewritten, re-hashed) keeps a weight in a file of its own
    choosing: refused by the device runtime and by the server in ONNX Runtime, and the file is never read (ONNX
    Runtime, given bytes, has no folder to read it from)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, numpy_helper

    from earlin_sklearn.edge import load_edge_program

    if name == "cloud.onnx":
        pytest.importorskip("fastapi")
        from earlin_sklearn._server import create_cloud_app

        def load(directory):
            create_cloud_app(directory, runtime="onnxruntime")
    else:
        def load(directory):
            load_edge_program(directory, runtime="onnxruntime")

    X, y = make_images(40)
    directory = tmp_path / "split"
    save_split(*ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu").fit(X).export_split(), directory,
               torch.from_numpy(X[:2]), formats=("onnx",))
    model = onnx.load_from_string((directory / name).read_bytes())
    weight = next(t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) > 1)
    (directory / "weights.bin").write_bytes(numpy_helper.to_array(weight).tobytes())
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "weights.bin"), ("offset", "0"), ("length", str((directory / "weights.bin").stat().st_size))):
        weight.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
    (directory / name).write_bytes(model.SerializeToString())
    rewrite_manifest(directory, files=[name])
    with pytest.raises(SplitVerificationError, match=f"{name}: ONNX Runtime cannot load it"):
        load(directory)


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo", "declared sizes"])
def test_program_reads_are_bounded(split, tmp_path, kind):
    """edge.pt2 as a link to an endless device, a FIFO with no writer, or a zip whose directory declares more
    bytes than the archive holds (a zip bomb): refused within seconds, before torch reads anything."""
    import struct
    import time

    directory = copy_split(split, tmp_path)
    program = directory / "edge.pt2"
    if kind == "declared sizes":
        buffer = io.BytesIO()  # the same members in Python's plain layout (no zip64 extra fields)
        with zipfile.ZipFile(program) as src, zipfile.ZipFile(buffer, "w") as dst:
            for info in src.infolist():
                dst.writestr(zipfile.ZipInfo(info.filename, info.date_time), src.read(info.filename))
        data = bytearray(buffer.getvalue())
        eocd = data.rfind(b"PK\x05\x06")
        at = struct.unpack("<I", data[eocd + 16 : eocd + 20])[0]  # the first central-directory entry
        data[at + 20 : at + 28] = struct.pack("<II", 0x7FFFFFFF, 0x7FFFFFFF)  # its packed and unpacked sizes
        program.write_bytes(bytes(data))
        rewrite_manifest(directory, files=["edge.pt2"])
    else:
        program.unlink()
        program.symlink_to("/dev/zero") if kind.startswith("symlink") else os.mkfifo(program)
    t0 = time.perf_counter()
    with pytest.raises(SplitVerificationError, match="declares more bytes" if kind == "declared sizes" else
                       "regular file"):
        load_split(directory, parts=("edge",))
    assert time.perf_counter() - t0 < 5
