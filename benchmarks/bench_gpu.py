"""The GPU path: feature extraction against the bare prefix forward on the device, per precision.

    python benchmarks/bench_gpu.py --device cuda
    python benchmarks/bench_gpu.py --device cpu --images 512     # a smoke run of the script itself

For the CIFAR ResNet-20 at ``layer1`` (32x32 inputs) and torchvision's
ResNet-18 at ``layer1`` (224x224), random weights (speed does not depend on
them): images per second of

- ``bare prefix``: the fx prefix up to the layer, on inputs already on the
  device (the ceiling);
- ``BackboneFeatures`` (float32, and each ``--precisions`` under autocast),
  fed from the host as a user's loader would: float32 batches, or uint8
  camera batches that cross as uint8 and are cast on the device.

Each measurement is the best of ``--repeats`` passes, interleaved, after a
warm-up, with ``torch.cuda.synchronize`` around the timed region on a GPU.
Also checks that a detector fitted on the device loads on a CPU-only
machine (simulated) with the same scores to 1e-4. The device is named in
the output: quote it with the figures.
"""

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_args  # noqa: E402

from earlin_sklearn import BackboneFeatures, ShallowFeatureOODDetector, split_model  # noqa: E402
from earlin_sklearn.models import cifar_resnet  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(model, layer, size, n, batch, device, precisions, repeats):
    torch.manual_seed(0)
    X = torch.rand(n, 3, size, size)
    X8 = (X * 255).to(torch.uint8)
    prefix, _ = split_model(model, layer)
    prefix = prefix.to(device).eval()
    X_dev = X.to(device)

    def bare():
        with torch.inference_mode():
            for i in range(0, n, batch):
                prefix(X_dev[i:i + batch])

    runs = {"bare prefix (inputs on the device)": bare}
    for precision in ["float32", *precisions]:
        ft = BackboneFeatures(model, layer, batch_size=batch, device=str(device), precision=precision,
                              n_threads=None).fit(X[:2].numpy())  # the same torch threads as the bare prefix
        runs[f"BackboneFeatures {precision}, float32 batches from the host"] = lambda ft=ft: ft.transform(X)
        runs[f"BackboneFeatures {precision}, uint8 batches from the host"] = lambda ft=ft: ft.transform(X8)
    for fn in runs.values():  # warm-up (kernels, autotuning, pinned buffers)
        fn()
    times = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name] = min(times[name], best(fn, device, 1))
    return {name: n / t for name, t in times.items()}


def loads_on_cpu(device):
    torch.manual_seed(0)
    X = torch.rand(200, 3, 32, 32).numpy()
    det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device=str(device)).fit(X, np.arange(200) % 10)
    blob = pickle.dumps(det)
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = pickle.loads(blob)
    finally:
        torch.cuda.is_available = available
    on_cpu = next(loaded.pipeline_["features"].module_.parameters()).device.type == "cpu"
    return on_cpu and bool(np.allclose(loaded.score_samples(X), det.score_samples(X), rtol=1e-4, atol=1e-4))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=8192, help="32x32 images (the 224x224 run uses an eighth)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precisions", nargs="+", default=["bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu"))
    args = parse_args(p, argv, "gpu", device="cpu", images=64, batch_size=32, precisions=["bfloat16"], repeats=1)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import torchvision

    results = {
        "device": name,
        "torch": torch.__version__,
        "ResNet-20 layer1, 32x32": measure(cifar_resnet(20), "layer1", 32, args.images, args.batch_size, device,
                                           args.precisions, args.repeats),
        "ResNet-18 layer1, 224x224": measure(torchvision.models.resnet18(weights=None), "layer1", 224,
                                             max(args.batch_size, args.images // 8), args.batch_size // 4, device,
                                             args.precisions, args.repeats),
        "fitted on the device, loads on a CPU-only machine with the same scores": loads_on_cpu(device),
    }
    lines = [f"Command: `python benchmarks/bench_gpu.py --device {args.device}`; device: {name}", "",
             "| model | configuration | images/s | ratio to the bare prefix |", "|---|---|---|---|"]
    for model, rows in results.items():
        if not isinstance(rows, dict):
            continue
        bare = next(v for k, v in rows.items() if k.startswith("bare"))
        lines += [f"| {model} | {k} | {v:.0f} | {v / bare:.2f} |" for k, v in rows.items()]
    lines.append(f"\nFitted on the device, loads on a CPU-only machine with the same scores: "
                 f"{results['fitted on the device, loads on a CPU-only machine with the same scores']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
