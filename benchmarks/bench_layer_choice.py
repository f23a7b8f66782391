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

Time, side by side in the same run: ``recommend_layer`` (one forward pass
per image, folds fitted on the shared features), the search it replaced
(``GridSearchCV`` refitting the detector per candidate and fold, each fit
running the backbone again, scored by ``make_pseudo_ood_scorer()``;
re-implemented here as :func:`grid_search_recommend`), and one default
detector fit at the deepest candidate, timed before and after.
``--skip-grid-search`` leaves the old search out (it takes minutes).
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import GridSearchCV

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_args, FAR_OOD, MODELS, TITLES, load_model, load_sets, machine, write_results  # noqa: E402

from earlin_sklearn import ShallowFeatureOODDetector, make_pseudo_ood_scorer, recommend_layer  # noqa: E402
from earlin_sklearn._cost import count_flops, flops_at_returns  # noqa: E402
from earlin_sklearn._layer_choice import (LayerRecommendation, default_candidates, pick,  # noqa: E402
                                          prefix_flops_share)
from earlin_sklearn.metrics import auroc, tnr_at_tpr  # noqa: E402


def grid_search_recommend(model, X, y, budget, cv=3, max_candidates=None):
    """``recommend_layer`` as it was before one pass: each candidate's prefix split and counted on its own, then
    ``GridSearchCV`` refits the default detector per candidate and fold (each fit runs the backbone), scored
    by ``make_pseudo_ood_scorer()`` (three pseudo-OOD images per held-out image)."""
    frozen = copy.deepcopy(model).eval()
    example = torch.as_tensor(np.asarray(X[:1]))
    full = count_flops(frozen, example)
    costs = {}
    for layer in default_candidates(frozen):
        try:
            costs[layer] = prefix_flops_share(frozen, layer, example, full)
        except ValueError:
            continue
    within = [layer for layer, c in costs.items() if c <= budget][:max_candidates]
    search = GridSearchCV(ShallowFeatureOODDetector(model, within[0]), {"layer": within},
                          scoring=make_pseudo_ood_scorer(), cv=cv, refit=False).fit(X, y)
    table = [{"layer": p["layer"], "n_channels": "all", "edge_flops": costs[p["layer"]], "pseudo_auroc": float(m),
              "pseudo_auroc_se": float(sd) / np.sqrt(search.n_splits_)}
             for p, m, sd in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"],
                                 search.cv_results_["std_test_score"])]
    row = pick(table, budget)
    return LayerRecommendation(row["layer"], {"layer": row["layer"], "n_channels": "all"}, table, budget)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_model(name, data_dir, budgets, max_ood, grid_search=True, grid_search_candidates=None):
    (Xtr, ytr), (Xte, _), ood = load_sets(data_dir, max_ood=max_ood, n_noise=max_ood, model=name)
    model = load_model(data_dir, name)
    y = ytr.numpy()
    at, total = flops_at_returns(copy.deepcopy(model).eval(), default_candidates(model), Xtr[:1])
    deepest = max((layer for layer in at if at[layer] / total <= max(budgets)), key=at.get)
    fit = lambda: ShallowFeatureOODDetector(model, deepest).fit(Xtr, y)  # noqa: E731
    fits = [timed(fit)[1]]
    rec, seconds = timed(lambda: recommend_layer(model, Xtr, y, layers=None, max_edge_flops=max(budgets)))
    fits.append(timed(fit)[1])
    old, old_seconds = timed(lambda: grid_search_recommend(model, Xtr, y, max(budgets),
                                                           max_candidates=grid_search_candidates)) if grid_search \
        else (None, None)
    print(TITLES[name]); print(rec, flush=True)
    print(f"recommend_layer {seconds:.1f} s; one default fit at {deepest} {fits[0]:.1f} / {fits[1]:.1f} s; "
          f"ratio {seconds / np.mean(fits):.2f}; grid search "
          f"{'skipped' if old_seconds is None else f'{old_seconds:.1f} s'}", flush=True)
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
                        "grid_search": None if old is None else old.within(budget).layer,
                        "recommended_auroc": real[chosen][0], "oracle_auroc": real[oracle][0],
                        "gap": real[oracle][0] - real[chosen][0],
                        "fixed_tolerance": fixed, "fixed_tolerance_auroc": real[fixed][0]})
    return {"layers": layers, "cost": cost, "pseudo": pseudo, "se": se, "real": real, "choices": choices,
            "recommend_seconds": seconds, "grid_search_seconds": old_seconds, "deepest": deepest,
            "fit_seconds": fits, "ratio_to_fit": seconds / float(np.mean(fits)),
            "grid_search_pseudo": None if old is None else {r["layer"]: r["pseudo_auroc"] for r in old.table}}


def reuse_grid_search(results, path):
    """The old search's times and choices from an earlier run's ``results.json`` (it takes half an hour)."""
    earlier = json.loads(Path(path).read_text())["results"]
    for name, r in results.items():
        before = earlier.get(name, {})
        r["grid_search_seconds"] = before.get("grid_search_seconds")
        r["grid_search_pseudo"] = before.get("grid_search_pseudo")
        old = {c["budget"]: c.get("grid_search") for c in before.get("choices", [])}
        for c in r["choices"]:
            c["grid_search"] = old.get(c["budget"])


def markdown(results, budgets, grid_search_from=None):
    lines = [f"Command: `python benchmarks/bench_layer_choice.py --data-dir <data>`; machine: {machine()['cpu']}", ""]
    where = "in the same run" if grid_search_from is None else \
        f"(the grid search's time and choices from an earlier run, `--grid-search-from {grid_search_from}`)"
    lines += [f"Time: `recommend_layer` against the grid search it replaced {where}, and one default detector fit "
              "at the deepest candidate, timed before and after `recommend_layer`:", "",
              "| model | recommend_layer (one pass) | grid search (before) | one default fit | "
              "one pass / one fit | grid search / one pass |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        old, one_pass = r["grid_search_seconds"], r["recommend_seconds"]
        old_time, speedup = ("not run", "-") if old is None else (f"{old:.0f} s", f"{old / one_pass:.0f}x")
        lines.append(f"| {TITLES[name]} | {one_pass:.1f} s | {old_time} | "
                     f"{r['fit_seconds'][0]:.1f} / {r['fit_seconds'][1]:.1f} s ({r['deepest']}) | "
                     f"{r['ratio_to_fit']:.2f}x | {speedup} |")
    lines.append("")
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
        lines += ["", "| edge budget | recommend_layer (no OOD data; one-SE rule) | grid search (before) | "
                  "best knowing the OOD sets | real AUROC: recommendation vs best | "
                  "old rule (tolerance 0.005): layer, real AUROC |",
                  "|---|---|---|---|---|---|"]
        for c in r["choices"]:
            lines.append(f"| {100 * c['budget']:.0f}% | {c['recommended']} | {c['grid_search'] or 'not run'} | "
                         f"{c['oracle']} | {100 * c['recommended_auroc']:.1f} vs {100 * c['oracle_auroc']:.1f} | "
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
    p.add_argument("--skip-grid-search", action="store_true", help="leave out the old search (minutes)")
    p.add_argument("--grid-search-from", help="an earlier run's results.json: its grid search instead of a new one")
    args = parse_args(p, argv, "layer_choice", models=["resnet20"], max_ood=16, budgets=[0.5])
    # (the smoke run's grid search covers only the first two candidates: it checks the code, in seconds)
    reuse = args.grid_search_from
    results = {name: run_model(name, args.data_dir, args.budgets, args.max_ood,
                               not (args.skip_grid_search or reuse), 2 if args.smoke else None)
               for name in args.models}
    if reuse:
        reuse_grid_search(results, reuse)
    table = markdown(results, args.budgets, reuse)
    write_results(args.out, table, {"machine": machine(), "budgets": args.budgets, "results": results})


if __name__ == "__main__":
    main()
