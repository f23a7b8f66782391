"""Speed and memory of earlin_sklearn, as ratios measured side by side in one run.

    python benchmarks/bench_speed.py --data-dir ../shared/data

1. Feature extraction: BackboneFeatures at layer1 vs a bare forward of the same prefix
   (ResNet-20, CIFAR-10 images), and vs a full forward (also torchvision resnet18 at 224x224).
2. The detector head's share of the edge module's latency (batch 1 and batch 64).
3. Tuning 8 downstream candidates (n_channels x metric, 3-fold GridSearchCV) on features
   extracted once, vs one detector fit.
4. Fit + score time of ours vs pytorch-ood's Mahalanobis on the same layer1 channel means.
5. Peak memory while fitting on 1,000 and 5,000 images at two batch sizes (pooled features only), in a fresh process.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).parent))
from common import best_time, interleaved, parse_args, load_model, load_sets, machine, write_json  # noqa: E402

from earlin_sklearn import (  # noqa: E402
    BackboneFeatures,
    ChannelSelector,
    DistanceDetector,
    ShallowFeatureOODDetector,
    make_ood_scorer,
    split_model,
)


def batched(fn, X, bs):
    for i in range(0, len(X), bs):
        fn(X[i : i + bs])


def extraction(model, X, layer, bs, label):
    # every estimator here runs with n_threads=None, torch's current setting, which the bare and full forwards use
    # too (the default "auto" takes half the cores: the ratios would compare thread counts)
    prefix, _ = split_model(model, layer)
    ft = BackboneFeatures(model, layer, batch_size=bs, device="cpu", n_threads=None).fit(X[:2])
    Xn = X.numpy()

    def bare():
        with torch.inference_mode():
            batched(prefix, X, bs)

    def full():
        with torch.inference_mode():
            batched(model, X, bs)

    t = interleaved({"ours": lambda: ft.transform(Xn), "bare": bare, "full": full})
    t_ours, t_bare, t_full = t["ours"], t["bare"], t["full"]
    row = {
        "model": label, "layer": layer, "images": len(X),
        "ours_img_s": len(X) / t_ours, "bare_prefix_img_s": len(X) / t_bare, "full_forward_img_s": len(X) / t_full,
        "ours_vs_bare_prefix": t_bare / t_ours, "speedup_vs_full_forward": t_full / t_ours,
    }
    print(f"[1] {label} {layer}: ours {row['ours_img_s']:.0f} img/s, bare prefix {row['bare_prefix_img_s']:.0f} img/s "
          f"(ratio {row['ours_vs_bare_prefix']:.2f}), full forward {row['full_forward_img_s']:.0f} img/s "
          f"(ours is {row['speedup_vs_full_forward']:.2f}x faster)", flush=True)
    return row


def head_share(det, X, calls=200):
    """Latency of the exported edge module against its bare prefix (the detector head's share: pooling + distances)."""
    edge, _ = det.export_split()

    rows = []
    for batch in (1, 64):
        x = X[:batch].contiguous()
        n = calls if batch == 1 else max(2, calls // 10)
        with torch.inference_mode():
            t = interleaved({"prefix": lambda: [edge.prefix(x) for _ in range(n)],
                             "edge": lambda: [edge(x) for _ in range(n)]}, rounds=7)
        t_prefix, t_edge = t["prefix"] / n, t["edge"] / n
        share = max(0.0, t_edge - t_prefix) / t_edge
        rows.append({"batch": batch, "prefix_ms": 1e3 * t_prefix, "edge_ms": 1e3 * t_edge,
                     "head_ms": 1e3 * (t_edge - t_prefix), "head_share": share})
        print(f"[2] batch {batch}: backbone prefix {1e3 * t_prefix:.3f} ms, edge module {1e3 * t_edge:.3f} ms: the "
              f"detector head (pooling + distances) is {100 * share:.1f}% of the edge latency", flush=True)
    return rows


def tuning(model, Xtr, ytr, X_ood, bs):
    t_one = best_time(lambda: ShallowFeatureOODDetector(model, "layer1", batch_size=bs, device="cpu",
                                                        n_threads=None).fit(Xtr, ytr), repeat=1)

    def tune():
        ft = BackboneFeatures(model, "layer1", batch_size=bs, device="cpu", n_threads=None).fit(Xtr[:2])
        F_id, F_ood = ft.transform(Xtr), ft.transform(X_ood)  # the only backbone passes
        grid = {"select__n_channels": [4, 8, 16, "all"], "distance__metric": ["mahalanobis", "euclidean"]}
        pipe = Pipeline([("select", ChannelSelector()), ("distance", DistanceDetector())])
        return GridSearchCV(pipe, grid, scoring=make_ood_scorer(F_ood), cv=3).fit(F_id, ytr)

    t0 = time.perf_counter()
    search = tune()
    t_tune = time.perf_counter() - t0
    row = {"one_fit_s": t_one, "grid_search_s": t_tune, "ratio": t_tune / t_one, "candidates": len(search.cv_results_["params"]),
           "folds": 3, "best_params": search.best_params_}
    print(f"[3] GridSearchCV, {row['candidates']} candidates x 3 folds on features extracted once: {t_tune:.1f} s "
          f"vs one fit {t_one:.1f} s = {row['ratio']:.2f}x", flush=True)
    return row


def versus_pytorch_ood(model, Xtr, ytr, X_eval, bs):
    try:
        from pytorch_ood.detector import Mahalanobis
    except ImportError:
        print("[4] pytorch-ood not installed: skipped")
        return None
    from torchvision.models.feature_extraction import create_feature_extractor

    def ours():
        det = ShallowFeatureOODDetector(model, "layer1", pooling="mean", n_channels="all", batch_size=bs,
                                        device="cpu", n_threads=None)
        det.fit(Xtr, ytr)
        return det.score_samples(X_eval)

    body = create_feature_extractor(model, {"layer1": "f"})

    def encoder(x):  # what a pytorch-ood user writes: a prefix network, then channel means
        return body(x)["f"].mean(dim=(2, 3))

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, ytr), batch_size=bs)

    def peer():
        det = Mahalanobis(encoder).fit(loader)
        with torch.no_grad():
            return -torch.cat([det.predict(X_eval[i : i + bs]) for i in range(0, len(X_eval), bs)]).numpy()

    t = interleaved({"ours": ours, "peer": peer}, rounds=3)
    t_ours, t_peer = t["ours"], t["peer"]
    row = {"ours_s": t_ours, "pytorch_ood_s": t_peer, "speedup": t_peer / t_ours}
    print(f"[4] fit + score, layer1 channel means, Mahalanobis: ours {t_ours:.1f} s, pytorch-ood {t_peer:.1f} s "
          f"(ours {row['speedup']:.2f}x faster)", flush=True)
    return row


MEMORY_CHILD = """
import json, os, sys, threading, time, torch
sys.path.insert(0, {bench!r})
from common import load_model, load_sets
from earlin_sklearn import ShallowFeatureOODDetector
(Xtr, ytr), _, _ = load_sets({data!r}, max_ood=1, n_noise=1)
Xtr, ytr = Xtr[:{n}].clone(), ytr[:{n}].clone()
model = load_model({data!r}, 20)
with torch.inference_mode():
    model(Xtr[:{bs}])  # warm the allocator: what any forward of one batch costs
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
samples, done = [], threading.Event()
def sample():
    while not done.is_set():
        samples.append(rss())
        time.sleep(0.002)
base = rss()
t = threading.Thread(target=sample)
t.start()
ShallowFeatureOODDetector(model, "layer1", batch_size={bs}, device="cpu", n_threads=None).fit(Xtr, ytr)
done.set(); t.join()
print(json.dumps({{"rss_before_fit_mib": base / 2**20, "rss_peak_during_fit_mib": max(samples) / 2**20,
                  "fit_extra_mib": (max(samples) - base) / 2**20, "samples": len(samples)}}))
"""


def memory(data_dir, sizes=None):
    """Peak resident memory of a fit above the loaded data and model, sampled every 2 ms in a fresh process."""
    rows = []
    for n, bs in sizes or ((1000, 64), (5000, 64), (1000, 256), (5000, 256)):
        code = MEMORY_CHILD.format(bench=str(Path(__file__).parent), data=str(data_dir), bs=bs, n=n)
        # Large blocks from mmap go back to the OS when freed, so RSS follows live memory; with glibc's
        # default heap reuse, RSS also keeps freed (fragmented) batch buffers and varies from run to run.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["images"], row["batch_size"] = n, bs
        row["stored_activations_would_be_mib"] = n * 16 * 32 * 32 * 4 / 2**20
        row["input_images_mib"] = n * 3 * 32 * 32 * 4 / 2**20
        rows.append(row)
        print(f"[5] fitting on {n:,} images, batch {bs}: resident memory peaks {row['fit_extra_mib']:.0f} MiB above the loaded "
              f"data and model (storing layer1 activations would take {row['stored_activations_would_be_mib']:.0f} MiB; "
              f"the images themselves take {row['input_images_mib']:.0f} MiB)", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n-images", type=int, default=2048, help="images for the throughput measurements")
    p.add_argument("--head-calls", type=int, default=200, help="calls per round of the head-share timing at batch 1")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed"))
    args = parse_args(p, argv, "speed", n_images=64, batch_size=32, head_calls=20)
    torch.manual_seed(0)
    bs = args.batch_size
    (Xtr, ytr), (Xte, _), ood = load_sets(args.data_dir, max_ood=1000, n_noise=1000)
    model = load_model(args.data_dir, 20)
    import torchvision

    results = {"machine": machine(), "args": vars(args)}
    results["extraction"] = [extraction(model, Xtr[: args.n_images], "layer1", bs, "CIFAR ResNet-20 (32x32)")]
    r18 = torchvision.models.resnet18().eval()
    big = 4 if args.smoke else 64
    results["extraction"].append(extraction(r18, torch.randn(big, 3, 224, 224), "layer1", 32, "torchvision resnet18 (224x224)"))
    det = ShallowFeatureOODDetector(model, "layer1", batch_size=bs, device="cpu", n_threads=None).fit(Xtr, ytr)
    results["head_share"] = head_share(det, Xte, args.head_calls)
    results["tuning"] = tuning(model, Xtr, ytr.numpy(), ood["Tiny-ImageNet"], bs)
    X_eval = torch.cat([Xte, ood["Tiny-ImageNet"]])
    results["vs_pytorch_ood"] = versus_pytorch_ood(model, Xtr, ytr, X_eval, bs)
    results["memory"] = memory(args.data_dir, sizes=((40, 16),) if args.smoke else None)
    out = Path(args.out)
    write_json(out / "results.json", results)
    print(f"wrote {out}/results.json")


if __name__ == "__main__":
    main()
