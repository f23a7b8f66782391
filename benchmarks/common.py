"""Shared by the benchmark scripts: the real data sets of ../shared/data, as normalized tensors.

Never imported by the package or its tests.
"""

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


def load_npz(data_dir, name):
    path = Path(data_dir) / name
    if not path.exists():
        raise SystemExit(f"{path} not found: pass --data-dir pointing at the shared benchmark data.")
    return np.load(path)


def load_sets(data_dir, max_ood=2000, n_noise=1000, seed=0, model="resnet20"):
    """ID train/test and the OOD sets, as NCHW float32 tensors normalized for ``model``.

    Large OOD sets are subsampled (first ``max_ood`` images); noise follows
    ODIN: Gaussian N(0.5, 1) clipped to [0, 1], and uniform U[0, 1].
    """
    model = model_name(model)
    rng = np.random.default_rng(seed)
    train = load_npz(data_dir, "cifar10_train_lossless5085.npz")
    test = load_npz(data_dir, "cifar10_test_lossless1017.npz")
    mnist = load_npz(data_dir, "mnist_test.npz")["x"][:max_ood]
    m = torch.from_numpy(mnist).permute(0, 3, 1, 2).float() / 255.0
    m = torch.nn.functional.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    ood = {
        "Tiny-ImageNet": normalize(load_npz(data_dir, "tinyimagenet_resize.npz")["x"][:max_ood], model),
        "SVHN": normalize(load_npz(data_dir, "svhn_train_partial288.npz")["x"], model),
        "MNIST": normalize_unit(m.clamp(0, 1), model),
        "Textures": normalize(load_npz(data_dir, "dtd_textures_partial1200.npz")["x"][:max_ood], model),
        "Gaussian noise": normalize_unit(
            torch.from_numpy(np.clip(rng.normal(0.5, 1.0, (n_noise, 3, 32, 32)), 0, 1)).float(), model),
        "Uniform noise": normalize_unit(torch.from_numpy(rng.uniform(0, 1, (n_noise, 3, 32, 32))).float(), model),
        "CIFAR-100": normalize(load_npz(data_dir, "cifar100_test_partial148.npz")["x"], model),
    }
    return (
        (normalize(train["x"], model), torch.from_numpy(train["y"])),
        (normalize(test["x"], model), torch.from_numpy(test["y"])),
        ood,
    )


def load_model(data_dir, model):
    """A development model (``"resnet20"``, ``"resnet56"``, ``"shufflenet"``; or depth 20 / 56) with its weights."""
    path, build, _, _, _ = MODELS[model_name(model)]
    return build(Path(data_dir) / path)


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


def fingerprint(t):
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:12]
