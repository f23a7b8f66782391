"""The documentation site builds offline with warnings as errors (nitpicky), and its gallery runs every
example in examples/ and shows its figures (this is also the test that the examples run)."""

import os
import shutil
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
    # built from a copy: sphinx-gallery and autosummary write into the source folder (auto_examples/, generated/,
    # the examples' own outputs), and a test must not write into the checkout
    source = tmp_path / "src"
    generated = shutil.ignore_patterns("auto_examples", "generated", "_build", "sg_execution_times.rst",
                                       "earlin_split", "*.joblib", "__pycache__")
    shutil.copytree(ROOT / "docs", source / "docs", ignore=generated)
    shutil.copytree(ROOT / "examples", source / "examples", ignore=generated)
    shutil.copytree(ROOT / "benchmarks" / "results", source / "benchmarks" / "results")
    before = _untracked_and_ignored()
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"),
         str(source / "docs"), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    examples = sorted(p.stem for p in (ROOT / "examples").glob("plot_*.py"))
    for name in examples:  # every gallery page ran its example and shows its figure
        assert (tmp_path / "html" / "auto_examples" / f"{name}.html").exists()
        assert list((tmp_path / "html" / "_images").glob(f"sphx_glr_{name}_001.png")), name
    assert (tmp_path / "html" / "generated" / "earlin_sklearn.ShallowFeatureOODDetector.html").exists()
    assert _untracked_and_ignored() <= before, "the docs build wrote into the checkout"
    # rendering: metric names such as TNR@95 are not e-mail links; the page style that wraps long API names in
    # titles and the sidebar and scrolls wide tables is on every page
    pages = sorted((tmp_path / "html").rglob("*.html"))
    assert not [p.name for p in pages if "mailto:" in p.read_text(errors="replace")]
    assert (tmp_path / "html" / "_static" / "earlin.css").exists()
    benchmarks = (tmp_path / "html" / "benchmarks.html").read_text()
    assert "earlin.css" in benchmarks and "pst-scrollable-table-container" in benchmarks
    # pages without sub-pages have no left column on wide screens (it was empty, and narrowed the tables)
    assert 'class="bd-sidebar-primary bd-sidebar hide-on-wide"' in benchmarks
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:  # a real browser renders the page at 1280 px (Debian's chromium; headless, as root)
        shot = tmp_path / "benchmarks.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--window-size=1280,1600", f"--screenshot={shot}", (tmp_path / "html" / "benchmarks.html").as_uri()],
                       capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 50_000


def _untracked_and_ignored():
    """Paths under docs/ and examples/ that git does not track (empty when this is not a git checkout)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "docs", "examples"],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line[3:] for line in out.stdout.splitlines() if line[:2] in ("??", "!!")}
