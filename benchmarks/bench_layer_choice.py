"""Choosing the cut without OOD data: recommend_layer's choice against the choice made knowing the OOD sets.

    python benchmarks/bench_layer_choice.py --data-dir ../shared/data

For each development model (ResNet-20, ResNet-56, ShuffleNetV2 x0.5),
``recommend_layer`` sees only the CIFAR-10 train subset and the model; its
candidates are the package's default cut points (every called layer at most
two levels deep: stems, stages and the residual/shuffle blocks inside them)
that fit in the largest edge budget. Beside it, for reporting only, each
candidate is fitted on the same data with the default detector and evaluated
on the CIFAR-10 test subset and the far-OOD sets. For every edge budget the
table compares the real far-OOD AUROC of the recommendation with that of the
best candidate under the same budget (the "oracle", which knows the OOD sets).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_args, FAR_OOD, MODELS, TITLES, load_model, load_sets, machine, write_results  # noqa: E402

from earlin_sklearn import ShallowFeatureOODDetector, recommend_layer  # noqa: E402
from earlin_sklearn._layer_choice import pick  # noqa: E402
from earlin_sklearn.metrics import auroc, tnr_at_tpr  # noqa: E402


def run_model(name, data_dir, budgets, max_ood):
    (Xtr, ytr), (Xte, _), ood = load_sets(data_dir, max_ood=max_ood, n_noise=max_ood, model=name)
    model = load_model(data_dir, name)
    y = ytr.numpy()
    t0 = time.perf_counter()
    rec = recommend_layer(model, Xtr, y, layers=None, max_edge_flops=max(budgets))
    seconds = time.perf_counter() - t0
    print(TITLES[name]); print(rec, flush=True)
    layers = [r["layer"] for r in rec.table]
    real = {}
    for layer in layers:
        det = ShallowFeatureOODDetector(model, layer, batch_size=256, device="cpu").fit(Xtr, y)
        s_id = det.score_samples(Xte)
        s = {k: det.score_samples(ood[k]) for k in FAR_OOD}
        real[layer] = (float(np.mean([auroc(s_id, s[k]) for k in FAR_OOD])),
                       float(np.mean([tnr_at_tpr(s_id, s[k]) for k in FAR_OOD])))
    cost = {r["layer"]: r["edge_flops"] for r in rec.table}
    pseudo = {r["layer"]: r["pseudo_auroc"] for r in rec.table}
    se = {r["layer"]: r["pseudo_auroc_se"] for r in rec.table}
    choices = []
    for budget in budgets:
        within = [layer for layer in layers if cost[layer] <= budget]
        if not within:
            continue
        chosen = rec.within(budget).layer
        fixed = pick(rec.table, budget, 0.005)["layer"]  # the rule before the one-standard-error rule
        oracle = max(within, key=lambda layer: real[layer][0])
        choices.append({"budget": budget, "recommended": chosen, "oracle": oracle,
                        "recommended_auroc": real[chosen][0], "oracle_auroc": real[oracle][0],
                        "gap": real[oracle][0] - real[chosen][0],
                        "fixed_tolerance": fixed, "fixed_tolerance_auroc": real[fixed][0]})
    return {"layers": layers, "cost": cost, "pseudo": pseudo, "se": se, "real": real, "choices": choices,
            "recommend_seconds": seconds}


def markdown(results, budgets):
    lines = [f"Command: `python benchmarks/bench_layer_choice.py --data-dir <data>`; machine: {machine()['cpu']}", ""]
    for name, r in results.items():
        lines += [f"**{TITLES[name]}** (recommend_layer took {r['recommend_seconds']:.0f} s)", "",
                  "| layer | edge FLOPs | pseudo-OOD AUROC +- SE (ID data only: chooses) | "
                  "real far-OOD AUROC / TNR@95 (reports) |",
                  "|---|---|---|---|"]
        for layer in r["layers"]:
            real = r["real"][layer]
            lines.append(f"| {layer} | {100 * r['cost'][layer]:.1f}% | {100 * r['pseudo'][layer]:.2f} +- "
                         f"{100 * r['se'][layer]:.2f} | "
                         f"{100 * real[0]:.1f} / {100 * real[1]:.1f} |")
        lines += ["", "| edge budget | recommend_layer (no OOD data; one-SE rule) | best knowing the OOD sets | "
                  "real AUROC: recommendation vs best | old rule (tolerance 0.005): layer, real AUROC |",
                  "|---|---|---|---|---|"]
        for c in r["choices"]:
            lines.append(f"| {100 * c['budget']:.0f}% | {c['recommended']} | {c['oracle']} | "
                         f"{100 * c['recommended_auroc']:.1f} vs {100 * c['oracle_auroc']:.1f} | "
                         f"{c['fixed_tolerance']}, {100 * c['fixed_tolerance_auroc']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--max-ood", type=int, default=1000)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.25, 0.5])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "layer_choice"))
    args = parse_args(p, argv, "layer_choice", models=["resnet20"], max_ood=16, budgets=[0.5])
    results = {name: run_model(name, args.data_dir, args.budgets, args.max_ood) for name in args.models}
    table = markdown(results, args.budgets)
    write_results(args.out, table, {"machine": machine(), "budgets": args.budgets, "results": results})


if __name__ == "__main__":
    main()
