"""Install entry point of earlin_sklearn (see README.rst)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = next(
    line.split('"')[1]
    for line in (HERE / "earlin_sklearn" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

# the device side (earlin_sklearn.edge): numpy, a runtime and the HTTP client; on a device without PyTorch,
# `pip install --no-deps earlin_sklearn` first, then these (docs/edge_cloud.rst, "A device without PyTorch")
EDGE = ["onnxruntime>=1.17", "httpx>=0.27", "pillow>=9"]
# httptools and uvloop: uvicorn's C HTTP parser and event loop, which it uses when installed (its "standard"
# extra without the reloader's packages); side by side, httptools' parser served GET /livez at 1.3-1.4x h11's
# requests/s (docs/serving.rst)
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "httptools>=0.6", "uvloop>=0.19; sys_platform != 'win32'", "httpx>=0.27",
         "zstandard>=0.22", "prometheus-client>=0.20"]
EXPORT = ["onnx>=1.16", "onnxruntime>=1.17", "onnxscript>=0.1"]
# ExecuTorch programs (.pte) and their int8 quantization (PT2E, torchao); its wheel also carries the
# runtime libraries the device side runs .pte files with. Its Python bindings link the installed libtorch
# without declaring which: 1.5 is the release checked beside torch 2.14 (raise the cap after checking).
EXECUTORCH = ["executorch>=1.5,<1.6"]
DOCS = ["sphinx>=7", "numpydoc>=1.6", "matplotlib>=3.6", "pydata-sphinx-theme>=0.15", "sphinx-gallery>=0.16",
        "myst-parser>=2", *EXPORT, *SERVE, "distributed>=2024.1"]
# the docs build (tests/test_docs.py, which also runs the examples) is part of the tests; .ci/oldest
# installs test-core, since ExecuTorch's wheels need a recent torch and numpy 2
# aiohttp: bench_fleet's clients (a load generator light enough to leave the cores to the server)
TEST_CORE = ["pytest>=7", "hypothesis>=6", "schemathesis>=4", "mypy>=1.10", *DOCS, *EDGE, "prometheus-client>=0.20",
             "aiohttp>=3.9"]
EXTRAS = {
    "test": [*TEST_CORE, *EXECUTORCH],
    "test-core": TEST_CORE,
    # fitting on a Dask cluster (DaskShards)
    "distributed": ["distributed>=2024.1"],
    # the cloud server and the edge runner (earlin serve-cloud / run-edge)
    # (zstandard: compressed activation bodies, --compression zstd)
    "serve": SERVE,
    "edge": EDGE,
    # benchmarks only: the peer library the baselines are validated against
    "benchmark": ["pytorch-ood>=0.4", "matplotlib>=3.6", "aiohttp>=3.9"],
    "export": EXPORT,
    "executorch": EXECUTORCH,
    "plot": ["matplotlib>=3.6"],
    "docs": DOCS,
}

setup(
    name="earlin_sklearn",
    version=VERSION,
    description="Early out-of-distribution detection from a shallow layer of a frozen CNN, "
    "as scikit-learn estimators, with the edge/cloud split of the model.",
    long_description=(HERE / "README.rst").read_text(),
    long_description_content_type="text/x-rst",
    license="BSD-3-Clause",
    packages=find_packages(include=["earlin_sklearn", "earlin_sklearn.*"]),
    # the C shim the device side compiles against ExecuTorch's runtime libraries (earlin_sklearn/edge/_executorch.py)
    package_data={"earlin_sklearn": ["py.typed"], "earlin_sklearn.edge": ["*.cpp"]},
    python_requires=">=3.10",
    install_requires=[
        # floors tested by .ci/oldest: scikit-learn 1.6's Yeo-Johnson fit fails on some
        # features; torch < 2.8 cannot export the split (torch.export with a dynamic batch)
        "numpy>=1.26",
        "scipy>=1.13",
        "scikit-learn>=1.7",
        # torch and torchvision must come as a matching pair (torchvision's C++ ops are
        # built against one torch release); pip resolves the pair from these ranges.
        "torch>=2.8",
        "torchvision>=0.23",
        "joblib>=1.2",
        # progress bars on long loops (verbose > 0)
        "tqdm>=4.60",
        # save_detector/load_detector: tensors in a format that holds no code (no pickle)
        "safetensors>=0.4",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["earlin=earlin_sklearn.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
