"""Collaborative inference end to end: the cloud server on loopback, camera images, three kinds of stream.

    python benchmarks/bench_collab.py --data-dir ../shared/data

ResNet-20 (CIFAR-10 checkpoint; ``--model resnet56`` or ``shufflenet`` for
the other development models), all detectors fitted on the CIFAR-10 train
subset only. Every input is a camera image (uint8 pixels); every upload is
a PNG file (lossless; the server decodes it and applies the model's
normalization), which for CIFAR-sized images is smaller than the cut
activations even with int8 + zstd (see ``split_cost``). Four strategies,
each over the real server and edge runner:

- ``cloud only``: every image uploaded, the cloud runs the model, nothing is
  rejected;
- ``cloud only + deep detector``: every image uploaded, the cloud rejects by
  the energy score of its logits (``TwoStageDetector(edge_share=0)``: the
  whole 95% budget in the cloud);
- ``EARLIN edge only``: the default detector at the end of the first stage
  (ResNet ``layer1``, ShuffleNet ``stage2``) rejects on the
  device (95%), accepted images are uploaded;
- ``EARLIN two-stage``: ``TwoStageDetector`` (edge and cloud at 97.5% each,
  95% together): the edge rejects far OOD, the cloud near OOD.

Thresholds (``--thresholds``): ``held-out`` (the default) sets every
detector's threshold again with ``calibrate_threshold`` on a fixed random
half of the CIFAR-10 test subset, ID images the backbone was not trained on;
the streams draw their ID images from the other half only. ``train`` keeps
the thresholds ``fit`` set on the training subset, where the logit scores of
the cloud stage are over-confident. Both use ID data only, and the streams
are the same in both.

Streams of ``--n`` inputs mix CIFAR-10 test images (ID) with OOD images at
10/30/50% OOD: ``far`` (Tiny-ImageNet, SVHN, MNIST, Textures, Gaussian and
uniform noise in equal shares), ``near`` (CIFAR-100) and ``mixed`` (half far,
half near). Overall accuracy: an OOD input is right when it is rejected
anywhere, an ID input when it gets its true class. "ID lost": ID inputs
rejected by a detector. Latency is measured per input on loopback;
"@ uplink" adds the time its bytes take at ``--uplink-mbit-s``.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (parse_args, FAR_OOD, MODELS, TITLES, calibration_split, camera_sets, first_stage, load_model,  # noqa: E402
                    load_sets, machine, preprocessing, write_results)

from earlin_sklearn import ShallowFeatureOODDetector, TwoStageDetector, save_split  # noqa: E402
from earlin_sklearn.edge import EdgeRecord, EdgeRunner  # noqa: E402
from earlin_sklearn.edge._wire import HEADER_ENCODING, HEADER_VERSION, encode_image  # noqa: E402

STRATEGIES = ("cloud only", "cloud only + deep detector", "EARLIN edge only", "EARLIN two-stage")
STREAMS = ("far", "near", "mixed")


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
            if httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
    proc.kill()
    raise RuntimeError("the cloud server did not start")


def cloud_only(url, version, images, labels):
    """Every image uploaded as PNG; the cloud runs the whole model (and its detector, if the split has one)."""
    import httpx

    records = []
    headers = {HEADER_VERSION: version, HEADER_ENCODING: "png"}
    with httpx.Client(base_url=url, headers=headers) as client:
        for i, (image, label) in enumerate(zip(images, labels)):
            t0 = time.perf_counter()
            body = encode_image(image, "png")
            r = client.post("/v1/raw", content=body)
            r.raise_for_status()
            answer = r.json()
            rec = EdgeRecord(i, True, float("nan"), "raw", len(body), 1e3 * (time.perf_counter() - t0),
                             int(answer["predictions"][0]), int(label))
            if "cloud_is_id" in answer:
                rec.cloud_is_id = bool(answer["cloud_is_id"][0])
            records.append(rec)
    return records


def make_stream(kind, Xte, yte, ood, n, ood_fraction, rng):
    """``n`` camera images: ID test images and a share ``ood_fraction`` of OOD ones, shuffled; label -1 is OOD."""
    n_ood = int(round(n * ood_fraction))
    ids = rng.choice(len(Xte), n - n_ood, replace=False)
    parts, labels = [Xte[ids]], [yte[ids]]
    far_n = {"far": n_ood, "near": 0, "mixed": n_ood // 2}[kind]
    sources = [(name, far_n // len(FAR_OOD) + (1 if k < far_n % len(FAR_OOD) else 0)) for k, name in enumerate(FAR_OOD)]
    sources.append(("CIFAR-100", n_ood - far_n))
    for name, m in sources:
        if m:
            parts.append(ood[name][rng.choice(len(ood[name]), m, replace=False)])
            labels.append(-np.ones(m, dtype=int))
    X, y = np.concatenate(parts), np.concatenate(labels)
    order = rng.permutation(len(X))
    return X[order], y[order]


def summarize(name, records, manifest, uplink_mbit_s):
    lat = np.array([r.latency_ms for r in records])
    net = np.array([8 * r.bytes_sent / (uplink_mbit_s * 1e6) * 1e3 for r in records])

    def accepted(r):  # by every detector the strategy has
        return r.is_id and r.cloud_is_id is not False

    right = [(accepted(r) and r.prediction == r.label) if r.label >= 0 else not accepted(r) for r in records]
    uploads = [r for r in records if r.uploaded]
    id_records = [r for r in records if r.label >= 0]
    return {
        "strategy": name,
        "requests": len(uploads),
        "bytes": int(sum(r.bytes_sent for r in records)),
        "cloud_gflops": len(uploads) * manifest["flops"]["full"] / 1e9,  # PNG uploads: the cloud runs the whole model
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p50_uplink_ms": float(np.percentile(lat + net, 50)),
        "p95_uplink_ms": float(np.percentile(lat + net, 95)),
        "accuracy": float(np.mean(right)),
        "id_lost": float(np.mean([not accepted(r) for r in id_records])),
        "ood_rejected": float(np.mean([not accepted(r) for r in records if r.label < 0])),
    }


def plot(rows, fractions, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(STREAMS), figsize=(4.2 * len(STREAMS), 6.4), sharex=True)
    for j, stream in enumerate(STREAMS):
        for name in STRATEGIES:
            sel = [r for r in rows if r["stream"] == stream and r["strategy"] == name]
            axes[0, j].plot(fractions, [100 * r["accuracy"] for r in sel], marker="o", label=name)
            axes[1, j].plot(fractions, [r["bytes"] / 1024 for r in sel], marker="o", label=name)
        axes[0, j].set_title(f"{stream} OOD stream")
        axes[1, j].set_ylim(bottom=0)
        axes[1, j].set_xlabel("OOD fraction of the stream")
    axes[0, 0].set_ylabel("overall accuracy (%)")
    axes[1, 0].set_ylabel("KiB uploaded (PNG)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(results):
    """One table over the models whose results are under ``results``: the figures the collaborative targets
    name, from each model's results.json (``--summary``)."""
    lines = ["Command: `python benchmarks/bench_collab.py --summary` over the runs of `bench_collab.py --model "
             "<model>` (held-out thresholds). Overall accuracy on the mixed stream at 50% OOD per strategy, "
             "two-stage EARLIN's upload share there, its overall accuracy minus cloud only + deep detector's on "
             "the near stream, and the ID inputs it lost over all nine streams.", "",
             "| model | mixed 50%: cloud only / + deep detector / edge only / two-stage | two-stage upload share "
             "(mixed 50%) | near stream 10 / 30 / 50%: two-stage minus deep detector (points) | two-stage ID lost |",
             "|---|---|---|---|---|"]
    for model in MODELS:
        path = results / ("collab" if model == "resnet20" else f"collab_{model}") / "results.json"
        if not path.exists():
            continue
        saved = json.loads(path.read_text())
        if saved["args"].get("thresholds", "held-out") != "held-out":
            continue
        rows = {(r["stream"], r["ood_fraction"], r["strategy"]): r for r in saved["rows"]}
        mixed = [rows["mixed", 0.5, name]["accuracy"] for name in STRATEGIES]
        share = rows["mixed", 0.5, "EARLIN two-stage"]["bytes"] / rows["mixed", 0.5, "cloud only"]["bytes"]
        near = [(rows["near", f, "EARLIN two-stage"], rows["near", f, "cloud only + deep detector"])
                for f in saved["args"]["fractions"]]
        lost = [r["id_lost"] for r in saved["rows"] if r["strategy"] == "EARLIN two-stage"]
        lines.append(f"| {TITLES[model]} | " + " / ".join(f"{100 * a:.1f}" for a in mixed)
                     + f"% | {100 * share:.0f}% | "
                     + " / ".join(f"{100 * (two['accuracy'] - deep['accuracy']):+.1f}" for two, deep in near)
                     + f" | {100 * min(lost):.1f}-{100 * max(lost):.1f}% |")
    (results / "collab_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir")
    p.add_argument("--summary", action="store_true",
                   help="only write results/collab_summary.md from the models' saved results")
    p.add_argument("--n", type=int, default=280, help="inputs per stream (at 50%% OOD the near stream needs "
                                                        "n/2 <= 148 CIFAR-100 images)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--uplink-mbit-s", type=float, default=10.0)
    p.add_argument("--thresholds", choices=("held-out", "train"), default="held-out",
                   help="calibrate every threshold on half of the ID test subset, or keep the training ones")
    p.add_argument("--model", choices=list(MODELS), default="resnet20")
    p.add_argument("--out", default=None, help="default: results/collab (ResNet-20), results/collab_<model>")
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from results.json")
    args = parse_args(p, argv, "collab", n=12, fractions=[0.5])
    if args.summary:
        return summary(Path(__file__).parent / "results")
    if args.data_dir is None:
        p.error("--data-dir is required (or --summary)")
    if args.out is None:
        name = "collab" if args.model == "resnet20" else f"collab_{args.model}"
        args.out = str(Path(__file__).parent / "results" / name)
    if args.plot_only:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        return plot(saved["rows"], saved["args"]["fractions"], Path(args.out) / "accuracy_and_bytes.png")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    (Xtr, ytr), (Xte, _), _ = load_sets(args.data_dir, max_ood=1000, n_noise=1000, model=args.model)
    _, (Pte, yte), camera_ood = camera_sets(args.data_dir, max_ood=1000, n_noise=1000)
    # a fixed half of the ID test subset for calibration, the other half for the streams (whichever --thresholds)
    calibration, streamed = calibration_split(len(yte))
    Pte, yte = Pte[streamed], yte[streamed]
    model = load_model(args.data_dir, args.model)
    edge_det = ShallowFeatureOODDetector(model, first_stage(args.model), device="cpu")
    fitted = {
        "edge": edge_det.fit(Xtr, ytr),
        "two-stage": TwoStageDetector(edge_det).fit(Xtr, ytr),
        "deep": TwoStageDetector(edge_det, edge_share=0.0).fit(Xtr, ytr),
    }
    if args.thresholds == "held-out":
        for det in fitted.values():
            det.calibrate_threshold(Xte[calibration])
    servers, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        dirs, urls, manifests = {}, {}, {}
        try:
            for key, det in fitted.items():
                dirs[key] = Path(tmp) / key
                save_split(*det.export_split(), dirs[key], Xtr[:8], formats=("pt2",),
                           preprocessing=preprocessing(args.model))
                manifests[key] = json.loads((dirs[key] / "split.json").read_text())
                port = free_port()
                urls[key] = f"http://127.0.0.1:{port}"
                servers.append(start_server(dirs[key], port))
            for stream in STREAMS:
                for fraction in args.fractions:
                    images, labels = make_stream(stream, Pte, yte, camera_ood, args.n, fraction, rng)
                    runs = {
                        "cloud only": cloud_only(urls["edge"], manifests["edge"]["version"], images, labels),
                        "cloud only + deep detector": cloud_only(urls["deep"], manifests["deep"]["version"], images,
                                                                 labels),
                    }
                    for name, key in (("EARLIN edge only", "edge"), ("EARLIN two-stage", "two-stage")):
                        with EdgeRunner(dirs[key], urls[key], upload="raw", encoding="png") as runner:
                            runs[name] = runner.run(images, labels=labels)
                    for name, records in runs.items():
                        row = {"stream": stream, "ood_fraction": fraction,
                               **summarize(name, records, manifests["edge"], args.uplink_mbit_s)}
                        rows.append(row)
                        print(f"{stream:5s} OOD {fraction:.0%} {name:28s} requests {row['requests']:4d}  "
                              f"{row['bytes'] / 1024:7.1f} KiB  p50 {row['p50_ms']:6.2f} ms  p95 {row['p95_ms']:6.2f} ms"
                              f"  accuracy {100 * row['accuracy']:5.1f}%  ID lost {100 * row['id_lost']:4.1f}%", flush=True)
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=30)
                server.stderr.close()

    lines = [f"Command: `python benchmarks/bench_collab.py --data-dir <data> --model {args.model} --n {args.n} "
             f"--thresholds {args.thresholds}`; model: {TITLES[args.model]}, edge at `{first_stage(args.model)}`; "
             f"machine: {machine()['cpu']}, {machine()['cores']} cores; server and edge runner on the same machine "
             "(loopback). Uploads are PNG files. Thresholds: "
             + ("calibrated on held-out ID images (half of the CIFAR-10 test subset; the streams use the other "
                "half)" if args.thresholds == "held-out" else "set by fit on the training subset") + ".\n",
             "| stream | OOD | strategy | cloud requests | KiB uploaded (share of cloud only) | cloud GFLOP | p50 / p95 ms | "
             f"p50 / p95 ms @ {args.uplink_mbit_s:g} Mbit/s | overall accuracy | ID lost | OOD rejected |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if (b["stream"], b["ood_fraction"], b["strategy"]) ==
                    (r["stream"], r["ood_fraction"], "cloud only"))
        lines.append(f"| {r['stream']} | {r['ood_fraction']:.0%} | {r['strategy']} | {r['requests']} | "
                     f"{r['bytes'] / 1024:.0f} ({100 * r['bytes'] / base['bytes']:.0f}%) | {r['cloud_gflops']:.2f} | "
                     f"{r['p50_ms']:.2f} / {r['p95_ms']:.2f} | {r['p50_uplink_ms']:.2f} / {r['p95_uplink_ms']:.2f} | "
                     f"{100 * r['accuracy']:.1f}% | {100 * r['id_lost']:.1f}% | {100 * r['ood_rejected']:.1f}% |")
    table = "\n".join(lines)
    write_results(args.out, table, {"machine": machine(), "args": vars(args), "rows": rows})
    plot(rows, args.fractions, Path(args.out) / "accuracy_and_bytes.png")


if __name__ == "__main__":
    main()
