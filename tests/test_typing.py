"""The public API's type hints, as a user's type checker sees them (the package ships ``py.typed``)."""

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

USER_CODE = '''
import numpy as np
from earlin_sklearn import (EdgeRunner, ShallowFeatureOODDetector, Split, TwoStageDetector, load_split,
                            recommend_layer, save_split)
from earlin_sklearn.metrics import auroc

X = np.zeros((4, 3, 8, 8), dtype=np.float32)
det = ShallowFeatureOODDetector(None, "layer1", n_channels=8, target_tpr=0.9)
fitted = det.fit(X, [0, 1, 0, 1])
reveal_type(fitted)
reveal_type(fitted.score_samples(X))
reveal_type(fitted.predict(X))
reveal_type(fitted.calibrate_threshold(X))
split = det.export_split()
reveal_type(split)
edge, cloud = split
reveal_type(load_split("folder", as_split=True))
reveal_type(load_split("folder", as_split=True).manifest)
reveal_type(recommend_layer(None, X, max_edge_flops=0.25).within(0.1))
reveal_type(auroc([1.0, 2.0], [0.0]))
reveal_type(TwoStageDetector(det).fit(X))
reveal_type(EdgeRunner("folder", "http://127.0.0.1:8000").run([X[0]]))
'''

MISTAKES = {  # line -> what the checker must say
    'ShallowFeatureOODDetector(None, 3)': 'Argument 2 to "ShallowFeatureOODDetector" has incompatible type "int"',
    'recommend_layer(None, [[0.0]], max_edge_flops="half")': 'Argument "max_edge_flops" to "recommend_layer"',
    'auroc([1.0], [0.0]).upper()': '"float" has no attribute "upper"',
    'ShallowFeatureOODDetector(None, "x").export_split().manifest.keys()': 'Item "None" of "dict[Any, Any] | None"',
    'load_split("folder", as_split=True).nonsense': '"Split" has no attribute "nonsense"',
}


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """One mypy run over the package, a user's script (``user.py``) and one of mistakes (``bad.py``)."""
    api = pytest.importorskip("mypy.api")
    folder = tmp_path_factory.mktemp("typing")
    (folder / "user.py").write_text(textwrap.dedent(USER_CODE))
    (folder / "bad.py").write_text("from earlin_sklearn import ShallowFeatureOODDetector, load_split, recommend_layer\n"
                                   "from earlin_sklearn.metrics import auroc\n" + "\n".join(MISTAKES) + "\n")
    out, err, status = api.run([str(folder / "user.py"), str(folder / "bad.py"), str(ROOT / "earlin_sklearn"),
                                "--config-file", str(ROOT / "setup.cfg"), "--cache-dir", str(folder / "cache"),
                                "--no-error-summary", "--show-error-codes"])
    return (out + err).splitlines()


def test_the_package_and_a_user_script_type_check(checked):
    errors = [line for line in checked if ": error:" in line and "bad.py:" not in line]
    assert not errors, "\n".join(checked)
    # (mypy versions differ in spelling the builtins: "builtins.float" or "float")
    revealed = [line.split("Revealed type is ", 1)[1].strip('"').replace("builtins.", "")
                for line in checked if "Revealed type" in line and "user.py:" in line]
    expected = [
        "earlin_sklearn._detector.ShallowFeatureOODDetector",
        "numpy.ndarray[tuple[Any, ...], numpy.dtype[Any]]",
        "numpy.ndarray[tuple[Any, ...], numpy.dtype[Any]]",
        "earlin_sklearn._detector.ShallowFeatureOODDetector",
        "earlin_sklearn._edge.Split",
        "earlin_sklearn._edge.Split",
        "dict[Any, Any] | None",
        "earlin_sklearn._layer_choice.LayerRecommendation",
        "float",
        "earlin_sklearn._two_stage.TwoStageDetector",
        "list[earlin_sklearn.edge._runner.EdgeRecord]",
    ]
    # numpy's own spelling of an array type differs between its versions: only its class is compared
    assert [r.split("[")[0] if r.startswith("numpy.ndarray") else r for r in revealed] == \
        [e.split("[")[0] if e.startswith("numpy.ndarray") else e for e in expected], "\n".join(checked)


def test_wrong_calls_are_type_errors(checked):
    for line, (call, message) in enumerate(MISTAKES.items(), start=3):
        said = [m for m in checked if f"bad.py:{line}:" in m]
        assert any(message in m for m in said), (call, said, checked)


def test_the_package_says_it_is_typed():
    assert (ROOT / "earlin_sklearn" / "py.typed").is_file()
    setup = (ROOT / "setup.py").read_text()
    assert '"earlin_sklearn": ["py.typed"]' in setup  # installed with the package, not only present in the tree


def test_what_a_type_checker_imports_is_every_lazy_export():
    """``earlin_sklearn/__init__.py`` imports its names lazily (PEP 562); its ``TYPE_CHECKING`` block names the
    same ones, so that no public name is ``Any`` to a checker."""
    import ast

    import earlin_sklearn

    tree = ast.parse((ROOT / "earlin_sklearn" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    imported = {alias.name for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert imported == set(earlin_sklearn._EXPORTS) | set(earlin_sklearn._SUBMODULES)
