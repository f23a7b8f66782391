"""CIFAR-10 OOD detection benchmark: EARLIN at the end of the first stage of ResNet-20, ResNet-56 and
ShuffleNetV2 (and optionally every stage) against the standard full-model detectors and against the
peer library pytorch-ood, measured in one run.

    python benchmarks/bench_detection.py --data-dir ../shared/data

ID: CIFAR-10 train subset (fit, 5085 images) and test subset (evaluate, 1017).
OOD: Tiny-ImageNet (resized), SVHN, MNIST (32x32, 3 channels), Textures (DTD),
Gaussian and uniform noise (ODIN recipe) = far OOD; CIFAR-100 = near OOD.
Nothing here is chosen with the OOD sets: every detector uses its defaults
(EARLIN's were chosen on ID data only, benchmarks/explore_detector.py); the
OOD sets are only scored. Writes results.md, results.json and plots under --out.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.pipeline import make_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from common import (parse_args, FAR_OOD, MODELS, NEAR_OOD, TITLES, first_stage, input_std, load_model, load_sets,  # noqa: E402
                    machine, write_json)

from earlin_sklearn import BackboneFeatures, ShallowFeatureOODDetector  # noqa: E402
from earlin_sklearn._cost import count_flops  # noqa: E402
from earlin_sklearn._layer_choice import prefix_flops_share  # noqa: E402
from earlin_sklearn.baselines import KNNDetector, LogitDetector  # noqa: E402
from earlin_sklearn.metrics import auroc, detection_accuracy, tnr_at_tpr  # noqa: E402
STAGES = {
    "resnet20": {"stem": "relu", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3"},
    "resnet56": {"stem": "relu", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3"},
    "shufflenet": {"stem": "conv1", "stage2": "stage2", "stage3": "stage3", "stage4": "stage4"},
}
PENULTIMATE = {"resnet20": ("pool", "mean"), "resnet56": ("pool", "mean"), "shufflenet": ("conv5", "mean")}
BASELINES = ["MSP", "Energy", "Max logit", "ODIN", "KNN (penultimate)", "Mahalanobis (penultimate)",
             "Mahalanobis (same layer, channel means)"]
# pytorch-ood's Mahalanobis on the first stage's channel means is EARLIN's paper setting there
PEER_TO_OURS = {"Mahalanobis (first stage means)": "Mahalanobis (same layer, channel means)"}


def evaluate(s_id, s_ood):
    rows = {}
    for name, s in s_ood.items():
        rows[name] = {"auroc": auroc(s_id, s), "tnr95": tnr_at_tpr(s_id, s), "det_acc": detection_accuracy(s_id, s)}
    rows["far mean"] = {k: float(np.mean([rows[n][k] for n in FAR_OOD])) for k in ("auroc", "tnr95", "det_acc")}
    return rows


def run_estimator(make, X_fit, y_fit, X_test, ood):
    t0 = time.perf_counter()
    est = make().fit(X_fit, y_fit)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_id = est.score_samples(X_test)
    s_ood = {k: est.score_samples(v) for k, v in ood.items()}
    t_score = time.perf_counter() - t0
    n_scored = len(X_test) + sum(len(v) for v in ood.values())
    return est, s_id, s_ood, {"fit_s": t_fit, "score_ms_per_image": 1e3 * t_score / n_scored}


def peer_results(model, key, Xtr, ytr, Xte, ood, batch_size):
    """pytorch-ood's detectors on the same model (and the same features where they take features)."""
    from pytorch_ood.detector import KNN, ODIN, EnergyBased, Mahalanobis, MaxSoftmax

    def feats(layer, pooled, X):
        ft = BackboneFeatures(model, layer, pooling="mean", batch_size=batch_size, device="cpu").fit(X[:2])  # noqa
        return torch.from_numpy(ft.transform(X)).float()

    out = {}
    evals = {"ID": Xte, **ood}
    with torch.inference_mode():
        logits = {k: torch.cat([model(v[i : i + batch_size]) for i in range(0, len(v), batch_size)]) for k, v in evals.items()}
    for name, fn in (("MSP", lambda z: MaxSoftmax.score(z)), ("Energy", lambda z: EnergyBased.score(z))):
        s = {k: -fn(v).numpy() for k, v in logits.items()}  # pytorch-ood: higher = more OOD
        out[name] = (s.pop("ID"), s)
    odin = ODIN(model, eps=0.0014, temperature=1000.0, norm_std=list(input_std(key)))
    s = {k: -torch.cat([odin.predict(v[i : i + batch_size]) for i in range(0, len(v), batch_size)]).detach().numpy()
         for k, v in evals.items()}
    out["ODIN"] = (s.pop("ID"), s)
    for name, layer, make in (
        ("Mahalanobis (penultimate)", PENULTIMATE[key][0], lambda: Mahalanobis(None)),
        ("KNN (penultimate)", PENULTIMATE[key][0], lambda: KNN(None, k=50)),
        ("Mahalanobis (first stage means)", first_stage(key), lambda: Mahalanobis(None)),
    ):
        det = make().fit_features(feats(layer, True, Xtr), ytr)
        s = {k: -det.predict_features(feats(layer, True, v)).numpy() for k, v in evals.items()}
        out[name] = (s.pop("ID"), s)
    return out


def fmt(x):
    return f"{100 * x:.1f}"


def summary(results):
    """Per model: the default detector at the first stage beside the best baseline of the same run."""
    lines = ["| model | EARLIN default @first stage: far AUROC / TNR@95 | test TPR (target 95%) | best baseline AUROC "
             "| best baseline TNR@95 | margin AUROC / TNR (points) | CIFAR-100 AUROC (near OOD): EARLIN / best baseline |",
             "|---|---|---|---|---|---|---|"]
    for key, res in results.items():
        d = res["detectors"][f"EARLIN @{res['first_stage']}"]
        m = d["metrics"]["far mean"]
        base = {n: res["detectors"][n] for n in BASELINES if n in res["detectors"]}
        best_a = max(base, key=lambda n: base[n]["metrics"]["far mean"]["auroc"])
        best_t = max(base, key=lambda n: base[n]["metrics"]["far mean"]["tnr95"])
        a, t = base[best_a]["metrics"]["far mean"]["auroc"], base[best_t]["metrics"]["far mean"]["tnr95"]
        near = max(b["metrics"]["CIFAR-100"]["auroc"] for b in base.values())
        lines.append(f"| {TITLES[key]} | **{fmt(m['auroc'])} / {fmt(m['tnr95'])}** | {fmt(d['test_tpr'])} | "
                     f"{fmt(a)} ({best_a}) | {fmt(t)} ({best_t}) | {100 * (m['auroc'] - a):+.1f} / {100 * (m['tnr95'] - t):+.1f} | "
                     f"{fmt(d['metrics']['CIFAR-100']['auroc'])} / {fmt(near)} |")
    return "\n".join(lines)


def markdown(results, peer):
    lines = ["## Summary\n", summary(results)]
    for depth, res in results.items():
        lines.append(f"\n### {TITLES[depth]} (test accuracy {fmt(res['accuracy'])}%)\n")
        head = "| detector | edge FLOPs | " + " | ".join(FAR_OOD + NEAR_OOD) + " | far mean AUROC | far mean TNR@95 | far mean det. acc. | fit s | ms/image |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for name, r in res["detectors"].items():
            m = r["metrics"]
            cells = [f"{fmt(m[k]['auroc'])} / {fmt(m[k]['tnr95'])}" for k in FAR_OOD + NEAR_OOD]
            lines.append(f"| {name} | {fmt(r['edge_flops'])}% | " + " | ".join(cells)
                         + f" | **{fmt(m['far mean']['auroc'])}** | **{fmt(m['far mean']['tnr95'])}** | {fmt(m['far mean']['det_acc'])}"
                         + f" | {r['fit_s']:.1f} | {r['score_ms_per_image']:.2f} |")
        lines.append("\nCells: AUROC / TNR at 95% TPR, in %. Edge FLOPs: share of the whole model's FLOPs that the edge part runs.")
        if depth in peer:
            lines.append(f"\n#### pytorch-ood 0.4 on {TITLES[depth]}, same model and features: far-OOD mean AUROC / TNR@95\n")
            lines += ["| detector | pytorch-ood | ours (same method) | AUROC difference |", "|---|---|---|---|"]
            for name, p in peer[depth].items():
                ours = res["detectors"].get(PEER_TO_OURS.get(name, name))
                diff = f"{100 * (ours['metrics']['far mean']['auroc'] - p['auroc']):+.2f}" if ours else "-"
                ours_s = f"{fmt(ours['metrics']['far mean']['auroc'])} / {fmt(ours['metrics']['far mean']['tnr95'])}" if ours else "-"
                lines.append(f"| {name} | {fmt(p['auroc'])} / {fmt(p['tnr95'])} | {ours_s} | {diff} |")
    return "\n".join(lines)


def plots(results, scores, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (depth, res) in zip(axes[0], results.items()):
        for prefix, marker in (("EARLIN", "o-"), ("EARLIN paper setting", "s--")):
            pts = [(r["edge_flops"], r["metrics"]["far mean"]["auroc"], n.split("@")[1])
                   for n, r in res["detectors"].items() if n.startswith(prefix + " @")]
            if pts:
                ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker, label=prefix)
                for x, y, label in pts:
                    ax.annotate(label, (100 * x, 100 * y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        for n, r in res["detectors"].items():
            if not n.startswith("EARLIN"):
                ax.scatter([100], [100 * r["metrics"]["far mean"]["auroc"]], marker="x")
                ax.annotate(n, (100, 100 * r["metrics"]["far mean"]["auroc"]), textcoords="offset points",
                            xytext=(-6, 0), ha="right", fontsize=7)
        ax.set_xlabel("edge FLOPs (% of the whole model)")
        ax.set_ylabel("mean far-OOD AUROC (%)")
        ax.set_title(f"{TITLES[depth]}: AUROC vs edge cost")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "auroc_vs_edge_flops.png", dpi=110)
    plt.close(fig)

    for depth, (s_id, s_ood, title) in scores.items():
        names = FAR_OOD + NEAR_OOD
        fig, axes = plt.subplots(2, 4, figsize=(17, 6.5))
        lo = min(np.percentile(s_id, 0.5), *[np.percentile(s_ood[n], 1) for n in names])
        bins = np.linspace(lo, max(s_id.max(), *[s_ood[n].max() for n in names]), 60)
        for ax, n in zip(axes.ravel(), names):
            ax.hist(s_id, bins=bins, alpha=0.6, density=True, label="CIFAR-10 test (ID)")
            ax.hist(np.clip(s_ood[n], lo, None), bins=bins, alpha=0.6, density=True, label=n)
            ax.axvline(title[1], color="k", lw=1, ls="--")
            ax.set_title(f"{n}: AUROC {100 * auroc(s_id, s_ood[n]):.1f}%", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"{title[0]} on {TITLES[depth]}: score_samples (dashed: threshold from ID training data)")
        fig.tight_layout()
        fig.savefig(out / f"score_histograms_{depth}.png", dpi=100)
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--all-stages", action="store_true", help="also EARLIN at every other stage (slower)")
    p.add_argument("--max-ood", type=int, default=1000, help="first N images of the large OOD sets (default 1000)")
    p.add_argument("--odin-fit", type=int, default=1000, help="ID training images that set the ODIN/MSP/energy thresholds")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-train", type=int, default=None, help="use only the first N ID training images (smoke tests)")
    p.add_argument("--no-peer", action="store_true", help="skip pytorch-ood")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "detection"))
    args = parse_args(p, argv, "detection", models=["resnet20"], max_ood=16, odin_fit=40, no_peer=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results, peer, scores = {}, {}, {}
    bs = args.batch_size
    for key in args.models:
        (Xtr, ytr), (Xte, yte), ood = load_sets(args.data_dir, max_ood=args.max_ood, n_noise=args.max_ood, model=key)
        Xtr, ytr = Xtr[: args.max_train], ytr[: args.max_train]
        print(f"{TITLES[key]}: ID train {len(Xtr)}, ID test {len(Xte)}; OOD: "
              + ", ".join(f"{k} {len(v)}" for k, v in ood.items()), flush=True)
        model = load_model(args.data_dir, key)
        with torch.inference_mode():
            acc = float((torch.cat([model(Xte[i : i + bs]) for i in range(0, len(Xte), bs)]).argmax(1) == yte).float().mean())
        full = count_flops(model, torch.zeros(1, 3, 32, 32))
        stage1 = first_stage(key)
        stage_name = next(n for n, layer in STAGES[key].items() if layer == stage1)
        res = {"accuracy": acc, "full_mflops": full / 1e6, "first_stage": stage_name, "detectors": {}}
        stages = STAGES[key] if args.all_stages else {stage_name: stage1}
        candidates = []
        for stage, layer in stages.items():
            candidates.append((f"EARLIN @{stage}", layer, lambda layer=layer: ShallowFeatureOODDetector(
                model, layer, batch_size=bs, device="cpu")))
            if args.all_stages:
                candidates.append((f"EARLIN paper setting @{stage}", layer, lambda layer=layer: ShallowFeatureOODDetector(
                    model, layer, pooling="mean", n_channels="all", extra_layers=(), gaussianize=None,
                    batch_size=bs, device="cpu")))
        pen, pen_pool = PENULTIMATE[key]
        candidates += [
            ("Mahalanobis (same layer, channel means)", stage1, lambda: ShallowFeatureOODDetector(
                model, stage1, pooling="mean", n_channels="all", extra_layers=(), gaussianize=None,
                batch_size=bs, device="cpu")),
            ("Mahalanobis (penultimate)", None, lambda: ShallowFeatureOODDetector(
                model, pen, pooling=pen_pool, n_channels="all", extra_layers=(), gaussianize=None,
                batch_size=bs, device="cpu")),
            ("KNN (penultimate)", None, lambda: make_pipeline(
                BackboneFeatures(model, pen, pooling=pen_pool, batch_size=bs, device="cpu"), KNNDetector(k=50))),
            ("MSP", "odin", lambda: LogitDetector(model, "msp", batch_size=bs, device="cpu")),
            ("Energy", "odin", lambda: LogitDetector(model, "energy", batch_size=bs, device="cpu")),
            ("Max logit", "odin", lambda: LogitDetector(model, "maxlogit", batch_size=bs, device="cpu")),
            ("ODIN", "odin", lambda: LogitDetector(model, "odin", temperature=1000.0, epsilon=0.0014,
                                                  input_std=input_std(key), batch_size=bs, device="cpu")),
        ]
        for name, layer, make in candidates:
            X_fit, y_fit = (Xtr[: args.odin_fit], None) if layer == "odin" else (Xtr, ytr.numpy())
            est, s_id, s_ood, times = run_estimator(make, X_fit, y_fit, Xte, ood)
            frac = (prefix_flops_share(model, layer, torch.zeros(1, 3, 32, 32), full)
                    if layer not in (None, "odin") else 1.0)
            offset = est.offset_ if hasattr(est, "offset_") else est[-1].offset_
            res["detectors"][name] = {"edge_flops": frac, "metrics": evaluate(s_id, s_ood),
                                      "test_tpr": float(np.mean(s_id >= offset)), **times}
            if name == f"EARLIN @{stage_name}":
                scores[key] = (s_id, s_ood, (f"EARLIN @{stage_name}", offset))
            m = res["detectors"][name]["metrics"]["far mean"]
            print(f"{TITLES[key]} {name:40} edge {100 * frac:5.1f}%  far AUROC {fmt(m['auroc'])}  TNR@95 {fmt(m['tnr95'])}"
                  f"  test TPR {fmt(res['detectors'][name]['test_tpr'])}  fit {times['fit_s']:.1f}s"
                  f"  {times['score_ms_per_image']:.2f} ms/img", flush=True)
        results[key] = res
        if not args.no_peer:
            try:
                peer_raw = peer_results(model, key, Xtr, ytr, Xte, ood, bs)
            except ImportError:
                print("pytorch-ood is not installed (pip install pytorch-ood): peer comparison skipped")
            else:
                peer[key] = {name: evaluate(s_id, s_ood)["far mean"] for name, (s_id, s_ood) in peer_raw.items()}
                for name, m in peer[key].items():
                    print(f"{TITLES[key]} pytorch-ood {name:32} far AUROC {fmt(m['auroc'])}  TNR@95 {fmt(m['tnr95'])}",
                          flush=True)

    table = markdown(results, peer)
    info = machine()
    header = (f"Command: `python benchmarks/bench_detection.py --data-dir <data> --models {' '.join(args.models)} "
              f"--max-ood {args.max_ood}{' --all-stages' if args.all_stages else ''}`\n\n"
              f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}\n")
    (out / "results.md").write_text(header + table + "\n")
    write_json(out / "results.json", {"machine": info, "args": vars(args), "results": results, "pytorch_ood": peer})
    plots(results, scores, out)
    print(table)
    print(f"\nwrote {out}/results.md, results.json, auroc_vs_edge_flops.png, score_histograms_*.png")


if __name__ == "__main__":
    main()
