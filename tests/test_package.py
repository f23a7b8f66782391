import subprocess
import sys

import earlin_sklearn


def test_import_is_light():
    code = ("import sys, earlin_sklearn; heavy = [m for m in ('fastapi', 'uvicorn', 'httpx', 'onnx', 'onnxruntime', "
            "'matplotlib', 'pytorch_ood') if m in sys.modules]; print(heavy); assert not heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_names_exist():
    for name in earlin_sklearn.__all__:
        assert hasattr(earlin_sklearn, name), name
