"""Shared by the benchmark scripts: the real data sets of ../shared/data, as normalized tensors.

Never imported by the package or its tests.
"""

import functools
import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from earlin_sklearn.models import (CIFAR_MEAN, CIFAR_STD, SHUFFLENET_CIFAR_MEAN, SHUFFLENET_CIFAR_STD,
                                   cifar_resnet, cifar_shufflenet_v2)

# The three development models: (checkpoint, builder, input mean, input std, end of the first stage).
MODELS = {
    "resnet20": ("weights/resnet20-12fca82f.th", lambda w: cifar_resnet(20, w), CIFAR_MEAN, CIFAR_STD, "layer1"),
    "resnet56": ("weights/resnet56-4bfd9763.th", lambda w: cifar_resnet(56, w), CIFAR_MEAN, CIFAR_STD, "layer1"),
    "shufflenet": ("weights/shufflenetv2_x0_5-1308b4e9.pt", lambda w: cifar_shufflenet_v2(w),
                   SHUFFLENET_CIFAR_MEAN, SHUFFLENET_CIFAR_STD, "stage2"),
}
TITLES = {"resnet20": "ResNet-20", "resnet56": "ResNet-56", "shufflenet": "ShuffleNetV2 x0.5"}
FAR_OOD = ["Tiny-ImageNet", "SVHN", "MNIST", "Textures", "Gaussian noise", "Uniform noise"]
NEAR_OOD = ["CIFAR-100"]


def model_name(model):
    """``20`` / ``56`` (older scripts) or a key of :data:`MODELS`."""
    return f"resnet{model}" if isinstance(model, int) else model


def to_unit(x_uint8_nhwc):
    """uint8 NHWC images -> float32 NCHW tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc)).permute(0, 3, 1, 2).float() / 255.0


def normalize_unit(x, model="resnet20"):
    """Float NCHW images in [0, 1] -> normalized as ``model`` expects."""
    _, _, mean, std, _ = MODELS[model_name(model)]
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def normalize(x_uint8_nhwc, model="resnet20"):
    """uint8 NHWC images -> float32 NCHW tensor normalized as ``model`` expects."""
    return normalize_unit(to_unit(x_uint8_nhwc), model)


def verified_path(data_dir, name):
    """``data_dir/name``, after checking it against the data's SHA256SUMS (refused on a mismatch)."""
    root = Path(data_dir)
    path = root / name
    if not path.exists():
        raise SystemExit(f"{path} not found: pass --data-dir pointing at the shared benchmark data.")
    sums = root / "SHA256SUMS"
    expected = dict(reversed(line.split(None, 1)) for line in sums.read_text().splitlines() if line.strip()) \
        if sums.exists() else {}
    if name not in expected:
        raise SystemExit(f"{name} is not listed in {sums}: refusing to load an unverified file.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected[name]:
        raise SystemExit(f"{path} does not match its SHA256SUMS entry (got {digest[:12]}...): refusing to load it.")
    return path


def load_npz(data_dir, name):
    """Arrays of a verified ``.npz`` (``allow_pickle`` stays False: no object arrays, no code)."""
    return np.load(verified_path(data_dir, name))


@functools.lru_cache(maxsize=4)
def _unit_sets(data_dir, max_ood, n_noise, seed):
    """The data sets in [0, 1], NCHW float32, read and decoded once per process (each model normalizes)."""
    rng = np.random.default_rng(seed)
    train = load_npz(data_dir, "cifar10_train_lossless5085.npz")
    test = load_npz(data_dir, "cifar10_test_lossless1017.npz")
    mnist = to_unit(load_npz(data_dir, "mnist_test.npz")["x"][:max_ood])
    mnist = torch.nn.functional.interpolate(mnist, size=(32, 32), mode="bilinear", align_corners=False)
    ood = {
        "Tiny-ImageNet": to_unit(load_npz(data_dir, "tinyimagenet_resize.npz")["x"][:max_ood]),
        "SVHN": to_unit(load_npz(data_dir, "svhn_train_partial288.npz")["x"]),
        "MNIST": mnist.repeat(1, 3, 1, 1).clamp(0, 1),
        "Textures": to_unit(load_npz(data_dir, "dtd_textures_partial1200.npz")["x"][:max_ood]),
        "Gaussian noise": torch.from_numpy(np.clip(rng.normal(0.5, 1.0, (n_noise, 3, 32, 32)), 0, 1)).float(),
        "Uniform noise": torch.from_numpy(rng.uniform(0, 1, (n_noise, 3, 32, 32))).float(),
        "CIFAR-100": to_unit(load_npz(data_dir, "cifar100_test_partial148.npz")["x"]),
    }
    return (to_unit(train["x"]), torch.from_numpy(train["y"])), (to_unit(test["x"]), torch.from_numpy(test["y"])), ood


def load_sets(data_dir, max_ood=2000, n_noise=1000, seed=0, model="resnet20"):
    """ID train/test and the OOD sets, as NCHW float32 tensors normalized for ``model``.

    Large OOD sets are subsampled (first ``max_ood`` images); noise follows
    ODIN: Gaussian N(0.5, 1) clipped to [0, 1], and uniform U[0, 1].
    """
    (xtr, ytr), (xte, yte), ood = _unit_sets(str(data_dir), max_ood, n_noise, seed)
    model = model_name(model)
    return ((normalize_unit(xtr, model), ytr), (normalize_unit(xte, model), yte),
            {k: normalize_unit(v, model) for k, v in ood.items()})


def camera_sets(data_dir, max_ood=2000, n_noise=1000, seed=0):
    """The same sets as :func:`load_sets`, as uint8 NHWC pixels: what a camera hands the edge device.

    CIFAR, Tiny-ImageNet, SVHN and Textures are their stored bytes; the
    resized MNIST and the noise images are rounded to 8-bit pixels.
    """
    (xtr, ytr), (xte, yte), ood = _unit_sets(str(data_dir), max_ood, n_noise, seed)

    def pixels(x):
        return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()

    return (pixels(xtr), ytr.numpy()), (pixels(xte), yte.numpy()), {k: pixels(v) for k, v in ood.items()}


def calibration_split(n):
    """A fixed random half of ``n`` ID test images for ``calibrate_threshold``, and the other half to evaluate on."""
    perm = np.random.default_rng(1).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def preprocessing(model):
    """The model's input normalization, as ``save_split(..., preprocessing=...)`` records it."""
    _, _, mean, std, _ = MODELS[model_name(model)]
    return {"mean": list(mean), "std": list(std)}


def load_model(data_dir, model):
    """A development model (``"resnet20"``, ``"resnet56"``, ``"shufflenet"``; or depth 20 / 56) with its
    verified weights (loaded with ``weights_only=True``)."""
    path, build, _, _, _ = MODELS[model_name(model)]
    return build(verified_path(data_dir, path))


def input_std(model):
    """Per-channel input std (ODIN's gradient step is divided by it)."""
    return MODELS[model_name(model)][3]


def first_stage(model):
    """The end of the model's first stage: the detection layer of the benchmarks."""
    return MODELS[model_name(model)][4]


def machine():
    """A short description of the machine the benchmark ran on."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float))


def write_results(out, markdown, payload, show=True):
    """``results.md`` (the markdown table the docs include) and ``results.json`` under ``out``; print the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown + "\n")
    write_json(out / "results.json", payload)
    if show:
        print(markdown)


def best_time(fn, repeat=3):
    """Minimum wall time of ``repeat`` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved(fns, rounds=5):
    """Minimum wall time of each function, run in turn ``rounds`` times (all see the same load)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(best_time(fn, repeat=1))
    return {name: min(t) for name, t in times.items()}


def fingerprint(t):
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:12]


# --- smoke runs: every script runs on tiny synthetic stand-ins of the shared data, in seconds (tests/test_benchmarks.py)

SMOKE_SIZES = {"cifar10_train_lossless5085.npz": 160, "cifar10_test_lossless1017.npz": 60,
               "tinyimagenet_resize.npz": 40, "svhn_train_partial288.npz": 24, "cifar100_test_partial148.npz": 24,
               "cifar100_test_partial916.npz": 30, "mnist_test.npz": 30, "dtd_textures_partial1200.npz": 24}


@functools.lru_cache(maxsize=1)
def smoke_data_dir():
    """A folder laid out like ``../shared/data``: the same file names and array layouts, holding a few
    synthetic images each and random (seeded) checkpoints of the three development models, with their
    SHA256SUMS. For ``--smoke`` runs only: its figures mean nothing."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="earlin_smoke_data_"))
    (root / "weights").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    for name, n in SMOKE_SIZES.items():
        y = np.arange(n) % (100 if "cifar100" in name else 10)
        if name.startswith("mnist"):
            x = (rng.uniform(0, 1, (n, 28, 28, 1)) > 0.8).astype(np.uint8) * 255
        else:
            base = np.sin((y[:, None, None] % 10 + 1) * 3 * xx + y[:, None, None]) * np.cos(2 * yy)
            x = np.clip(127 + 80 * base[..., None] + rng.normal(0, 25, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        arrays = {"x": x, "y": y.astype(np.int64), "idx": np.arange(n)}
        if "cifar100" in name:
            arrays["y_coarse"] = (y // 5).astype(np.int64)
        np.savez(root / name, **arrays)
    torch.manual_seed(0)
    for depth, name in ((20, "resnet20-12fca82f.th"), (56, "resnet56-4bfd9763.th")):
        state = {f"module.{k}": v for k, v in cifar_resnet(depth).state_dict().items()}
        torch.save({"state_dict": state}, root / "weights" / name)
    torch.save(cifar_shufflenet_v2().state_dict(), root / "weights" / "shufflenetv2_x0_5-1308b4e9.pt")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    (root / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root)}\n"
                                             for p in files))
    return str(root)


def smoke_out(name):
    """A fresh folder for a smoke run's results: never the committed ``benchmarks/results``."""
    import tempfile

    return tempfile.mkdtemp(prefix=f"earlin_smoke_{name}_")


def parse_args(parser, argv, name, **smoke):
    """``parser.parse_args(argv)`` with ``--smoke``: the shared data replaced by :func:`smoke_data_dir`, the
    results written to a temporary folder, and the script's sizes set to ``smoke`` (seconds, not minutes)."""
    parser.add_argument("--smoke", action="store_true",
                        help="seconds on tiny synthetic data, results to a temporary folder (the test suite runs this)")
    for action in parser._actions:
        if action.dest == "data_dir":
            action.required = False
    args = parser.parse_args(argv)
    if args.smoke:
        if hasattr(args, "data_dir"):
            args.data_dir = smoke_data_dir()
        if hasattr(args, "out"):
            args.out = smoke_out(name)
        for key, value in smoke.items():
            setattr(args, key, value)
    elif getattr(args, "data_dir", "") is None:
        parser.error("--data-dir is required: the folder of the shared benchmark data (../shared/data)")
    return args
