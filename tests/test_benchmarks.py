"""Every script in benchmarks/ runs in its smoke mode (tiny synthetic data, seconds): a benchmark that breaks
fails here, not when someone next reproduces a figure. The figures of a smoke run mean nothing; the committed
results are never touched (smoke runs write to temporary folders)."""

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "common")
# scripts whose smoke run needs an optional package the README's test install may lack
NEEDS = {"bench_edge": ["executorch", "onnxruntime", "onnx"], "bench_collab": ["httpx", "uvicorn", "fastapi"],
         "bench_server": ["httpx", "uvicorn", "fastapi"], "bench_scale": ["distributed"],
         "bench_fleet": ["httpx", "uvicorn", "fastapi", "prometheus_client", "aiohttp", "onnxruntime", "onnx"],
         "status_page": ["httpx", "uvicorn", "fastapi", "prometheus_client"]}


def test_every_script_has_a_smoke_mode():
    assert set(SCRIPTS) >= {"bench_edge", "bench_speed", "bench_detection", "explore_detector"}
    for name in SCRIPTS:  # common.parse_args adds --smoke
        assert "parse_args(p, argv" in (BENCHMARKS / f"{name}.py").read_text(), name


@pytest.mark.filterwarnings("ignore")  # tiny synthetic data: the package's warnings about it are expected
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_smoke_run(name, monkeypatch, capsys):
    for module in NEEDS.get(name, []):
        pytest.importorskip(module)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    before = {p: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").rglob("*") if p.is_file()}
    module.main(["--smoke"])
    assert capsys.readouterr().out.strip(), f"{name} --smoke printed nothing"
    after = {p: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").rglob("*") if p.is_file()}
    assert after == before, f"{name} --smoke wrote into benchmarks/results"
    sys.modules.pop(name, None)
