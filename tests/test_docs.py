"""The documentation site builds offline with warnings as errors (nitpicky), and its gallery runs every
example in examples/ and shows its figures (this is also the test that the examples run)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx_gallery")
pytest.importorskip("pydata_sphinx_theme")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_docs_build_offline_without_warnings(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("EARLIN_DOCS_ONLINE", None)
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"),
         str(ROOT / "docs"), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    examples = sorted(p.stem for p in (ROOT / "examples").glob("plot_*.py"))
    for name in examples:  # every gallery page ran its example and shows its figure
        assert (tmp_path / "html" / "auto_examples" / f"{name}.html").exists()
        assert list((tmp_path / "html" / "_images").glob(f"sphx_glr_{name}_001.png")), name
    assert (tmp_path / "html" / "generated" / "earlin_sklearn.ShallowFeatureOODDetector.html").exists()
