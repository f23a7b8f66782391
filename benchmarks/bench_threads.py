"""Intra-op threads on a shared machine: the default of ``n_threads`` measured under contention.

    python benchmarks/bench_threads.py

For each thread count (1, half the cores, all cores) and each load (the machine
idle; one other process spinning on one core), a fresh process times
(a) BackboneFeatures.transform of 2,000 CIFAR-size images through ResNet-20 up
to ``layer1`` (batch 128) and (b) the exported edge module at batch 1 (median of
300 calls). No data or weights are needed: speed does not depend on them.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_args, write_results  # noqa: E402

CHILD = r"""
import json, sys, time, numpy as np, torch
from earlin_sklearn import ShallowFeatureOODDetector
from earlin_sklearn.models import cifar_resnet
n_threads, n_images, n_calls = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
X = torch.randn(max(n_images, 500, n_calls + 30), 3, 32, 32).numpy()
det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu", n_threads=n_threads).fit(X[:500], np.arange(500) % 10)
features = det.pipeline_["features"]
features.transform(X[:256])  # warm up
t0 = time.perf_counter(); features.transform(X[:n_images]); transform_s = time.perf_counter() - t0
edge, _ = det.export_split()
torch.set_num_threads(n_threads)
x1 = torch.as_tensor(X[:1])
lat = []
with torch.inference_mode():
    for i in range(n_calls + 30):
        t0 = time.perf_counter(); edge(torch.as_tensor(X[i:i + 1])); lat.append(time.perf_counter() - t0)
print(json.dumps({"transform_s": transform_s, "edge_ms_p50": 1e3 * float(np.median(lat[30:]))}))
"""


def run(n_threads, busy, n_images=2000, n_calls=300):
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        env = {**os.environ, "OMP_NUM_THREADS": str(n_threads)}
        out = subprocess.run([sys.executable, "-c", CHILD, str(n_threads), str(n_images), str(n_calls)], capture_output=True, text=True,
                             check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "threads"))
    args = parse_args(p, argv, "threads")
    sizes = {"n_images": 64, "n_calls": 10} if args.smoke else {}
    cores = os.cpu_count() or 1
    counts = [1] if args.smoke else sorted({1, max(1, cores // 2), cores})
    rows = []
    loads = (False,) if args.smoke else (False, True)
    for busy in loads:
        for n in counts:
            r = run(n, busy, **sizes)
            rows.append({"threads": n, "other_process_busy": busy, **r})
            print(rows[-1], flush=True)
    base = {busy: next(r for r in rows if r["threads"] == 1 and r["other_process_busy"] == busy) for busy in loads}
    lines = [f"Command: `python benchmarks/bench_threads.py`; {cores} cores", "",
             "| threads | other process busy on one core | transform 2,000 images (s) | vs 1 thread | "
             "edge batch-1 latency p50 (ms) | vs 1 thread |", "|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r["other_process_busy"]]
        lines.append(f"| {r['threads']} | {'yes' if r['other_process_busy'] else 'no'} | {r['transform_s']:.2f} | "
                     f"{r['transform_s'] / b['transform_s']:.2f}x | {r['edge_ms_p50']:.2f} | "
                     f"{r['edge_ms_p50'] / b['edge_ms_p50']:.2f}x |")
    write_results(args.out, "\n".join(lines), {"cores": cores, "rows": rows})


if __name__ == "__main__":
    main()
