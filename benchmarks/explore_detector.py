"""Exploration behind the detector's defaults: pooling, distance, centroids, channel selection, layer.

    python benchmarks/explore_detector.py --data-dir ../shared/data

ResNet-20 (CIFAR-10 checkpoint), fitted on the CIFAR-10 train subset. For each
configuration: mean far-OOD AUROC and TNR at 95% TPR, the near-OOD (CIFAR-100)
AUROC, and the pseudo-OOD AUROC of make_pseudo_ood_scorer's kinds, which needs
no OOD data. Writes results/explore/results.md.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import FAR_OOD, load_model, load_sets, machine  # noqa: E402

from earlin_sklearn import BackboneFeatures, ChannelSelector, DistanceDetector, make_pseudo_ood  # noqa: E402
from earlin_sklearn.metrics import auroc, tnr_at_tpr  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--max-ood", type=int, default=2000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "explore"))
    args = p.parse_args(argv)
    (Xtr, ytr), (Xte, _), ood = load_sets(args.data_dir, max_ood=args.max_ood)
    y = ytr.numpy()
    model = load_model(args.data_dir, 20)
    pseudo = {k: make_pseudo_ood(Xte.numpy(), k, 0) for k in ("shuffle", "blur", "noise")}
    cache = {}

    def features(layer, pooling):
        if (layer, pooling) not in cache:
            ft = BackboneFeatures(model, layer, pooling=pooling, batch_size=256, device="cpu").fit(Xtr[:2])
            cache[layer, pooling] = (ft.transform(Xtr), ft.transform(Xte), {k: ft.transform(v) for k, v in ood.items()},
                                     {k: ft.transform(v) for k, v in pseudo.items()})
        return cache[layer, pooling]

    rows = []

    def run(layer, pooling, metric="mahalanobis", cc=True, n_channels="all", criterion="auto"):
        if "+" in layer:  # several taps of the edge part, concatenated
            parts = [features(name, pooling) for name in layer.split("+")]
            Ftr, Fte = np.hstack([q[0] for q in parts]), np.hstack([q[1] for q in parts])
            Fo = {k: np.hstack([q[2][k] for q in parts]) for k in parts[0][2]}
            Fp = {k: np.hstack([q[3][k] for q in parts]) for k in parts[0][3]}
        else:
            Ftr, Fte, Fo, Fp = features(layer, pooling)
        sel = ChannelSelector(n_channels=n_channels, criterion=criterion).fit(Ftr, y)
        det = DistanceDetector(metric=metric, class_conditional=cc).fit(sel.transform(Ftr), y if cc else None)
        s_id = det.score_samples(sel.transform(Fte))
        s = {k: det.score_samples(sel.transform(v)) for k, v in Fo.items()}
        row = {
            "layer": layer, "pooling": pooling, "metric": metric, "centroids": "class" if cc else "global",
            "channels": f"{criterion} {n_channels}" if n_channels != "all" else "all",
            "far_auroc": np.mean([auroc(s_id, s[k]) for k in FAR_OOD]),
            "far_tnr95": np.mean([tnr_at_tpr(s_id, s[k]) for k in FAR_OOD]),
            "cifar100_auroc": auroc(s_id, s["CIFAR-100"]),
            "pseudo_auroc": np.mean([auroc(s_id, det.score_samples(sel.transform(v))) for v in Fp.values()]),
        }
        rows.append(row)
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()), flush=True)

    for layer in ("relu", "layer1"):
        for pooling in ("mean", "meanstd", "max"):
            for cc in (True, False):
                for metric in ("mahalanobis", "euclidean", "cosine"):
                    run(layer, pooling, metric, cc)
    for n in (0.25, 0.5, 0.75):
        for criterion in ("fisher", "variance"):
            run("layer1", "meanstd", n_channels=n, criterion=criterion)
    run("layer1.0+layer1.1+layer1", "meanstd")
    run("relu+layer1.0+layer1.1+layer1", "meanstd")
    run("relu+layer1", "meanstd")

    head = "| layer | pooling | distance | centroids | channels | far AUROC | far TNR@95 | CIFAR-100 AUROC | pseudo-OOD AUROC |"
    lines = [f"Command: `python benchmarks/explore_detector.py --data-dir <data> --max-ood {args.max_ood}`; "
             f"machine: {machine()['cpu']}\n", head, "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['pooling']} | {r['metric']} | {r['centroids']} | {r['channels']} | "
                     f"{100 * r['far_auroc']:.1f} | {100 * r['far_tnr95']:.1f} | {100 * r['cifar100_auroc']:.1f} | "
                     f"{100 * r['pseudo_auroc']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
