"""Scale: fit throughput and peak memory, one process against all local cores and a Dask LocalCluster.

    python benchmarks/bench_scale.py
    python benchmarks/bench_scale.py --sizes 10000 50000 --big 0
    python benchmarks/bench_scale.py --memory      # peak numpy memory of the fit, held against streamed

Every configuration runs in a fresh process (peak memory is that process's
maximum resident set, also given above its size after the imports; for the
cluster, the client's and the largest worker's). The images are synthetic and made on the fly by the Dataset from
their index, as a dataset that reads files would: nothing holds them all.

Modes (``ShallowFeatureOODDetector`` with its defaults, labels ``i % 10``):

- ``held``: what fitting did before streaming, for reference: every pooled
  feature row held in memory (``BackboneFeatures.transform``), then the array
  steps fitted on them; one process, one thread;
- ``1 process``: the streaming fit, one torch thread;
- ``1 process, glibc thresholds``: the same, with glibc's mmap and trim
  thresholds fixed at 32 and 64 MiB by environment variables
  (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), the values the
  Dask workers get for a fit (see ``earlin_sklearn._distributed.roomy_allocator``);
- ``all cores``: the streaming fit, one process, one torch thread per core;
- ``LocalCluster``: the streaming fit through :class:`DaskShards` on a
  ``LocalCluster`` of one single-threaded worker process per core (cluster
  start-up is reported apart and not in the fit time).

Sizes: CIFAR-like 32x32 images through the CIFAR ResNet-20 to ``layer1``
(``--sizes``), and ImageNet-like 224x224 images through torchvision's
ResNet-18 to ``layer1`` (``--big`` images). Weights are random: speed and
memory do not depend on them.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_args  # noqa: E402


class SyntheticImages(Dataset):
    """Image ``i``: uniform noise from a generator seeded with ``i``, label ``i % 10``."""

    def __init__(self, n, size):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(i))
        return torch.rand(3, self.size, self.size, generator=g), int(i) % 10


def _model(kind):
    torch.manual_seed(0)
    if kind == "cifar":
        from earlin_sklearn.models import cifar_resnet

        return cifar_resnet(20), "layer1", 32
    import torchvision

    return torchvision.models.resnet18(weights=None), "layer1", 224


def _peak_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(mode, n, kind):
    from earlin_sklearn import BackboneFeatures, DaskShards, ShallowFeatureOODDetector

    if mode.endswith(" (numpy memory)"):
        return numpy_memory(mode.replace(" (numpy memory)", ""), n, kind)

    cores = os.cpu_count() or 1
    net, layer, size = _model(kind)
    data = SyntheticImages(n, size)
    threads = cores if mode == "all cores" else 1
    det = ShallowFeatureOODDetector(net, layer, device="cpu", n_threads=threads, batch_size=128)
    result = {"mode": mode, "n": n, "kind": kind, "baseline_mb": _peak_mb()}
    if mode == "LocalCluster":
        from distributed import Client, LocalCluster

        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=cores, threads_per_worker=1, processes=True, dashboard_address=None,
                               host="127.0.0.1")
        client = Client(cluster)
        client.run(lambda: __import__("earlin_sklearn._detector"))  # workers import torch before the clock starts
        result["startup_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        det.fit(DaskShards(data, client=client))
        result["fit_s"] = time.perf_counter() - t0
        result["worker_peak_mb"] = max(client.run(_peak_mb).values())
        client.close()
        cluster.close()
    elif mode == "held":
        t0 = time.perf_counter()
        loader = DataLoader(data, batch_size=128)
        features = BackboneFeatures(net, layer, device="cpu", n_threads=1,
                                    extra_layers=det._features().extra_layers).fit(data[0][0][None].numpy())
        F, y = features.features_and_labels(loader)
        from sklearn.preprocessing import PowerTransformer

        from earlin_sklearn import DistanceDetector

        F = PowerTransformer().fit_transform(F)
        DistanceDetector().fit(F, y)
        result["fit_s"] = time.perf_counter() - t0
    else:  # "1 process", "1 process, glibc thresholds", "all cores"
        t0 = time.perf_counter()
        det.fit(DataLoader(data, batch_size=128))
        result["fit_s"] = time.perf_counter() - t0
    result["images_per_s"] = n / result["fit_s"]
    result["peak_mb"] = _peak_mb()
    print(json.dumps(result))


ROOMY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


def numpy_memory(mode, n, kind):
    """Peak memory of the arrays the fit allocates (numpy reports its allocations to tracemalloc; torch's
    per-batch buffers do not, and are bounded by the batch size): what the fit keeps, free of the
    allocator's retention that makes the resident set noisy."""
    import tracemalloc

    from earlin_sklearn import BackboneFeatures, DistanceDetector, ShallowFeatureOODDetector
    from sklearn.preprocessing import PowerTransformer

    net, layer, size = _model(kind)
    data = SyntheticImages(n, size)
    det = ShallowFeatureOODDetector(net, layer, device="cpu", n_threads=1)
    tracemalloc.start()
    if mode == "held":
        features = BackboneFeatures(net, layer, device="cpu", n_threads=1,
                                    extra_layers=det._features().extra_layers).fit(data[0][0][None].numpy())
        F, y = features.features_and_labels(DataLoader(data, batch_size=128))
        DistanceDetector().fit(PowerTransformer().fit_transform(F), y)
    else:
        det.fit(DataLoader(data, batch_size=128))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"mode": mode, "n": n, "kind": kind, "numpy_peak_mb": peak / 2**20}))


def run(mode, n, kind):
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() if mode == "all cores" else 1),
           **(ROOMY if mode == "1 process, glibc thresholds" else {})}
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(n), kind], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[10_000, 50_000, 100_000])
    p.add_argument("--big", type=int, default=1000, help="224x224 images through ResNet-18 (0 skips)")
    p.add_argument("--modes", nargs="+",
                   default=["held", "1 process", "1 process, glibc thresholds", "all cores", "LocalCluster"])
    p.add_argument("--memory", action="store_true",
                   help="instead: peak numpy memory of 'held' and '1 process' fits (tracemalloc), per size")
    p.add_argument("--render", action="store_true", help="rewrite results.md from results.json")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale"))
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parse_args(p, argv, "scale", sizes=[200], big=0, modes=["held", "1 process"])
    if args.child:
        return child(args.child[0], int(args.child[1]), args.child[2])
    if args.memory:
        return memory_table(args)
    if args.render:
        rows = json.loads((Path(args.out) / "results.json").read_text())["rows"]
        table = render(rows)
        (Path(args.out) / "results.md").write_text(table + "\n")
        return print(table)
    rows = []
    plan = [(n, "cifar") for n in args.sizes] + ([(args.big, "imagenet")] if args.big else [])
    for n, kind in plan:
        for mode in args.modes:
            r = run(mode, n, kind)
            rows.append(r)
            print(f"{kind:9s} {n:7d} {mode:28s} {r['images_per_s']:8.0f} img/s  peak {r['peak_mb']:7.0f} MB"
                  + (f"  worker peak {r['worker_peak_mb']:.0f} MB  start-up {r['startup_s']:.1f} s"
                     if "worker_peak_mb" in r else ""), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = render(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)


def render(rows):
    """The results table, with each mode's throughput as a ratio to the single-process fit of the same run."""
    lines = ["| images | model input | mode | images/s | ratio to 1 process | peak MB | peak above imports MB "
             "| worker peak MB |", "|---|---|---|---|---|---|---|---|"]
    for n, kind in dict.fromkeys((r["n"], r["kind"]) for r in rows):
        base = next((r for r in rows if r["n"] == n and r["kind"] == kind and r["mode"] == "1 process"), None)
        for r in (r for r in rows if r["n"] == n and r["kind"] == kind):
            ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}" if base else "-"
            worker = f"{r['worker_peak_mb']:.0f}" if "worker_peak_mb" in r else "-"
            lines.append(f"| {n:,} | {'32x32 ResNet-20' if kind == 'cifar' else '224x224 ResNet-18'} | {r['mode']} | "
                         f"{r['images_per_s']:.0f} | {ratio} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} | "
                         f"{worker} |")
    return "\n".join(lines)


def memory_table(args):
    rows = []
    for n in args.sizes:
        for mode in ("held", "1 process"):
            r = run(f"{mode} (numpy memory)", n, "cifar")
            rows.append(r)
            print(f"{n:7d} {mode:10s} numpy peak {r['numpy_peak_mb']:8.1f} MB", flush=True)
    lines = ["| images (32x32, ResNet-20 layer1) | " + " | ".join(f"{n:,}" for n in args.sizes) + " |",
             "|---" * (1 + len(args.sizes)) + "|"]
    for mode in ("held", "1 process"):
        label = "features held, then fitted (before)" if mode == "held" else "streaming fit"
        lines.append(f"| {label}: peak numpy MB | " + " | ".join(
            f"{r['numpy_peak_mb']:.1f}" for r in rows if r["mode"] == mode) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=1))
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
