"""Collaborative inference for real: the cloud server on loopback, the edge runner on mixed streams.

    python benchmarks/bench_collab.py --data-dir ../shared/data

ResNet-20 (CIFAR-10 checkpoint) cut at layer1 with the default detector,
fitted on the CIFAR-10 train subset. Streams of --n inputs mix CIFAR-10 test
images (ID) with OOD images (Tiny-ImageNet, SVHN, MNIST, Gaussian and
uniform noise in equal shares) at OOD fractions 0.1, 0.3 and 0.5. Each
stream is served five ways: cloud only (every input uploaded, the cloud runs
the whole model) and EARLIN (the edge rejects OOD inputs, uploads the cut
activations in float32/float16/int8, or the raw input).

Overall accuracy: an ID input is right when the cloud's prediction is its
label, an OOD input when it is rejected (cloud only rejects nothing).
Latency is measured end to end per input on loopback (no network delay);
"latency @10 Mbit/s" adds the time the bytes sent would take on a 10 Mbit/s uplink.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import FAR_OOD, load_model, load_sets, machine, write_json  # noqa: E402

from earlin_sklearn import ShallowFeatureOODDetector, save_split  # noqa: E402
from earlin_sklearn._edge_runner import EdgeRecord, EdgeRunner  # noqa: E402
from earlin_sklearn._protocol import HEADER_VERSION, encode  # noqa: E402


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(split_dir, port, *options, global_options=()):
    """``earlin [global_options] serve-cloud split_dir --port port [options]`` in its own process, once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "earlin_sklearn", *global_options, "serve-cloud", str(split_dir),
                             "--port", str(port), *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
    proc.kill()
    raise RuntimeError("the cloud server did not start")


def cloud_only(url, version, X, labels):
    """Every input uploaded raw; the cloud runs the whole model."""
    import httpx

    records = []
    with httpx.Client(base_url=url, headers={HEADER_VERSION: version}) as client:
        for i, (x, lab) in enumerate(zip(X, labels)):
            t0 = time.perf_counter()
            body = encode([x[None]], "float32")
            r = client.post("/v1/raw", content=body)
            r.raise_for_status()
            records.append(EdgeRecord(i, True, float("nan"), "raw", len(body), 1e3 * (time.perf_counter() - t0),
                                      int(r.json()["predictions"][0]), int(lab)))
    return records


def make_stream(Xte, yte, ood, n, ood_fraction, rng):
    n_ood = int(round(n * ood_fraction))
    ids = rng.choice(len(Xte), n - n_ood, replace=False)
    parts, labels = [Xte[ids]], [yte[ids].numpy()]
    for k, name in enumerate(FAR_OOD):
        m = n_ood // len(FAR_OOD) + (1 if k < n_ood % len(FAR_OOD) else 0)
        parts.append(ood[name][rng.choice(len(ood[name]), m, replace=False)])
        labels.append(-np.ones(m, dtype=int))
    X, y = torch.cat(parts), np.concatenate(labels)
    order = rng.permutation(len(X))
    return X[order], y[order]


def summarize(name, records, manifest, uplink_mbit_s):
    lat = np.array([r.latency_ms for r in records])
    net = np.array([8 * r.bytes_sent / (uplink_mbit_s * 1e6) * 1e3 for r in records])
    right = [(r.prediction == r.label) if r.label >= 0 else (not r.is_id) for r in records]
    uploads = [r for r in records if r.uploaded]
    flops = manifest["flops"]
    cloud_flops = sum(flops["full"] if r.uploaded == "raw" else flops["cloud"] for r in uploads)
    return {
        "strategy": name,
        "requests": len(uploads),
        "bytes": int(sum(r.bytes_sent for r in records)),
        "cloud_gflops": cloud_flops / 1e9,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p50_10mbit_ms": float(np.percentile(lat + net, 50)),
        "p95_10mbit_ms": float(np.percentile(lat + net, 95)),
        "accuracy": float(np.mean(right)),
        "id_accuracy": float(np.mean([r.prediction == r.label for r in records if r.label >= 0])),
        "ood_rejected": float(np.mean([not r.is_id for r in records if r.label < 0])) if any(r.label < 0 for r in records) else float("nan"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--n", type=int, default=400, help="inputs per stream")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--uplink-mbit-s", type=float, default=10.0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "collab"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    (Xtr, ytr), (Xte, yte), ood = load_sets(args.data_dir, max_ood=1000, n_noise=1000)
    model = load_model(args.data_dir, 20)
    det = ShallowFeatureOODDetector(model, "layer1", device="cpu").fit(Xtr, ytr)
    edge, cloud = det.export_split()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        split_dir = Path(tmp)
        save_split(edge, cloud, split_dir, Xte[:8], formats=("pt2",))
        import json

        manifest = json.loads((split_dir / "split.json").read_text())
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(split_dir, port)
        try:
            for fraction in args.fractions:
                X, y = make_stream(Xte, yte, ood, args.n, fraction, rng)
                runs = {"cloud only (raw float32)": cloud_only(url, manifest["version"], X, y)}
                for upload, encoding in (("activations", "float32"), ("activations", "float16"),
                                         ("activations", "int8"), ("raw", "float32")):
                    with EdgeRunner(split_dir, url, upload=upload, encoding=encoding) as runner:
                        runs[f"EARLIN {upload} {encoding}"] = runner.run(X, labels=y)
                for name, records in runs.items():
                    row = {"ood_fraction": fraction, **summarize(name, records, manifest, args.uplink_mbit_s)}
                    rows.append(row)
                    print(f"OOD {fraction:.0%} {name:30} requests {row['requests']:4d}  bytes {row['bytes'] / 1024:8.0f} KiB"
                          f"  cloud {row['cloud_gflops']:6.2f} GFLOP  p50 {row['p50_ms']:6.2f} ms  p95 {row['p95_ms']:6.2f} ms"
                          f"  accuracy {100 * row['accuracy']:5.1f}%", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
            server.stderr.close()

    lines = [f"Command: `python benchmarks/bench_collab.py --data-dir <data> --n {args.n}`; machine: "
             f"{machine()['cpu']}, {machine()['cores']} cores; server and edge runner on the same machine (loopback).\n",
             "| OOD fraction | strategy | cloud requests | KiB uploaded | cloud GFLOP | p50 ms | p95 ms | "
             f"p50 / p95 ms @{args.uplink_mbit_s:g} Mbit/s | overall accuracy | ID accuracy | OOD rejected |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["ood_fraction"] == r["ood_fraction"] and b["strategy"].startswith("cloud only"))
        rel = "" if r is base else f" ({100 * r['bytes'] / base['bytes']:.0f}%)"
        lines.append(f"| {r['ood_fraction']:.1f} | {r['strategy']} | {r['requests']} | {r['bytes'] / 1024:.0f}{rel} | "
                     f"{r['cloud_gflops']:.2f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p50_10mbit_ms']:.2f} / {r['p95_10mbit_ms']:.2f} | "
                     f"{100 * r['accuracy']:.1f}% | {100 * r['id_accuracy']:.1f}% | "
                     + ("-" if r["strategy"].startswith("cloud only") else f"{100 * r['ood_rejected']:.1f}%") + " |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    write_json(out / "results.json", {"machine": machine(), "args": vars(args), "rows": rows})
    print(table)


if __name__ == "__main__":
    main()
