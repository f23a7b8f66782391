import subprocess
import sys

import pytest

import earlin_sklearn


def test_import_is_light():
    code = ("import sys, earlin_sklearn; heavy = [m for m in ('fastapi', 'uvicorn', 'httpx', 'onnx', 'onnxruntime', "
            "'matplotlib', 'pytorch_ood') if m in sys.modules]; print(heavy); assert not heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_names_exist():
    for name in earlin_sklearn.__all__:
        assert hasattr(earlin_sklearn, name), name


def test_every_package_warning_is_an_earlin_warning():
    """setup.cfg turns EarlinWarning into errors in the tests: a warning of another class would slip through."""
    import ast
    from pathlib import Path

    import earlin_sklearn

    offenders = []
    for path in Path(earlin_sklearn.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn":
                category = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "category"), None)
                if category is None or not issubclass(getattr(earlin_sklearn.exceptions, ast.unparse(category),
                                                                  type(None)), earlin_sklearn.EarlinWarning):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_cli_parses_before_importing_torch():
    code = ("import sys\nfrom earlin_sklearn.__main__ import main\n"
            "for argv in (['--help'], ['--version'], ['demo', '--layer', 'bogus']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout + result.stderr
    assert "invalid choice: 'bogus'" in result.stderr


def test_a_missing_extra_is_named():
    from earlin_sklearn._optional import require

    with pytest.raises(ImportError, match=r"pip install 'earlin_sklearn\[serve\]'"):
        require("earlin serve-cloud", "serve", "a_module_that_is_not_there")
