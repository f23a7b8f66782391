"""Choosing the cut without OOD data: recommend_layer's choice against the choice made knowing the OOD sets.

    python benchmarks/bench_layer_choice.py --data-dir ../shared/data

ResNet-20 (CIFAR-10 checkpoint). recommend_layer sees only the CIFAR-10 train
subset; the real far-OOD AUROC of each candidate (fitted on the same data,
evaluated on the CIFAR-10 test subset and the far-OOD sets) is computed
beside it, for every edge budget.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import FAR_OOD, load_model, load_sets, machine, write_json  # noqa: E402

from earlin_sklearn import ShallowFeatureOODDetector, recommend_layer  # noqa: E402
from earlin_sklearn.metrics import auroc, tnr_at_tpr  # noqa: E402

LAYERS = ["relu", "layer1.0", "layer1", "layer2.0", "layer2", "layer3"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--max-ood", type=int, default=1000)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.25, 0.5, 1.0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "layer_choice"))
    args = p.parse_args(argv)
    (Xtr, ytr), (Xte, _), ood = load_sets(args.data_dir, max_ood=args.max_ood, n_noise=args.max_ood)
    model = load_model(args.data_dir, 20)
    y = ytr.numpy()

    rec = recommend_layer(model, Xtr, y, layers=LAYERS, max_edge_flops=1.0)
    print(rec)
    real = {}
    for layer in LAYERS:
        det = ShallowFeatureOODDetector(model, layer, batch_size=256, device="cpu").fit(Xtr, y)
        s_id = det.score_samples(Xte)
        s = {k: det.score_samples(ood[k]) for k in FAR_OOD}
        real[layer] = (float(np.mean([auroc(s_id, s[k]) for k in FAR_OOD])), float(np.mean([tnr_at_tpr(s_id, s[k]) for k in FAR_OOD])))
    cost = {r["layer"]: r["edge_flops"] for r in rec.table}
    pseudo = {r["layer"]: r["pseudo_auroc"] for r in rec.table}

    lines = [f"Command: `python benchmarks/bench_layer_choice.py --data-dir <data>`; machine: {machine()['cpu']}\n",
             "| layer | edge FLOPs | pseudo-OOD AUROC (ID data only) | real far-OOD AUROC / TNR@95 |", "|---|---|---|---|"]
    for layer in LAYERS:
        lines.append(f"| {layer} | {100 * cost[layer]:.1f}% | {100 * pseudo[layer]:.2f} | {100 * real[layer][0]:.1f} / {100 * real[layer][1]:.1f} |")
    lines += ["", "| edge budget | recommend_layer (no OOD data) | best knowing the OOD sets | real AUROC of the recommendation vs best |",
              "|---|---|---|---|"]
    choices = []
    for budget in args.budgets:
        within = [layer for layer in LAYERS if cost[layer] <= budget]
        if not within:
            continue
        pick = rec.within(budget).layer
        oracle = max(within, key=lambda layer: real[layer][0])
        choices.append({"budget": budget, "recommended": pick, "oracle": oracle,
                        "recommended_auroc": real[pick][0], "oracle_auroc": real[oracle][0]})
        lines.append(f"| {100 * budget:.0f}% | {pick} | {oracle} | {100 * real[pick][0]:.1f} vs {100 * real[oracle][0]:.1f} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    write_json(out / "results.json", {"machine": machine(), "table": rec.table, "real": real, "choices": choices})
    print(table)


if __name__ == "__main__":
    main()
