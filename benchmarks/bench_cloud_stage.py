"""The two-stage detector's cloud stage: energy against energy + KNN, on near-OOD, far-OOD and mixed streams.

    python benchmarks/bench_cloud_stage.py --data-dir ../shared/data

For each development model and each cloud stage (``cloud_method="energy"``,
the default, and ``"energy+knn"``, :class:`~earlin_sklearn.baselines.EnergyKNNDetector`),
a ``TwoStageDetector`` is fitted on the CIFAR-10 train subset; every
threshold is then set again with ``calibrate_threshold`` on a fixed random
half of the CIFAR-10 test subset (95% in all), for ``edge_share`` 0 (cloud
only with that score: the edge rejects only what scores below every
calibration image), 0.25 and 0.5. Reported on the other half (ID) and on
CIFAR-100 (the 916-image subset, near OOD) and the far-OOD sets:

- the cloud score's own CIFAR-100 AUROC (ID: the evaluation half);
- overall accuracy of streams at 10/30/50% OOD, as ``bench_collab.py``
  counts it (an OOD input is right when rejected anywhere, an ID input when
  accepted and classified right), as the expectation over every image of
  each set instead of a random draw: ``(1 - f) * P(ID accepted and right) +
  f * P(OOD rejected)``, the OOD part CIFAR-100 (near), the far sets in equal
  shares (far), or half of each (mixed);
- two-stage minus cloud only with the same score, on the near stream: the
  gap the two-stage design pays for deciding part of the budget on the edge.

And what the KNN term costs the cloud: the exported cloud part (``CloudHead``) of
each stage on batches of 32 payloads, one thread, run in turn round after
round (``--rounds``), as inputs per second and as the ratio energy + KNN /
energy.

In process, not over HTTP: the server's decisions are the in-process ones
(``tests/test_two_stage.py``, ``tests/test_energy_knn.py``); ``bench_collab.py``
measures the wire.
"""

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (FAR_OOD, MODELS, TITLES, calibration_split, first_stage, interleaved, load_model,  # noqa: E402
                    load_npz, load_sets, machine, normalize_unit, parse_args, to_unit, write_results)

from earlin_sklearn import ShallowFeatureOODDetector, TwoStageDetector  # noqa: E402
from earlin_sklearn.metrics import auroc  # noqa: E402

METHODS = ("energy", "energy+knn")
FRACTIONS = (0.1, 0.3, 0.5)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--max-ood", type=int, default=1000)
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--rounds", type=int, default=7, help="timing rounds of the cloud parts")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cloud_stage"))
    args = parse_args(p, argv, "cloud_stage", models=["resnet20"], max_ood=16, shares=[0.0, 0.5], rounds=1)
    if 0.0 not in args.shares:
        p.error("--shares must include 0 (cloud only, the comparison)")
    results = {}
    for name in args.models:
        (Xtr, ytr), (Xte, yte), ood = load_sets(args.data_dir, max_ood=args.max_ood, n_noise=args.max_ood,
                                                model=name)
        ood["CIFAR-100"] = normalize_unit(to_unit(load_npz(args.data_dir, "cifar100_test_partial916.npz")["x"]), name)
        model = load_model(args.data_dir, name)
        cal, ev = calibration_split(len(Xte))
        sets = {"ID": Xte[ev], "CIFAR-100": ood["CIFAR-100"], **{s: ood[s] for s in FAR_OOD}}
        with torch.inference_mode():
            right_class = (model(Xte[ev]).argmax(1) == yte[ev]).numpy()
        results[name] = {}
        clouds = {}
        for method in METHODS:
            two = TwoStageDetector(ShallowFeatureOODDetector(model, first_stage(name), batch_size=256, device="cpu"),
                                   cloud_method=method).fit(Xtr, ytr.numpy())
            edge = {s: two.edge_.score_samples(X) for s, X in sets.items()}  # the thresholds below move, not these
            cloud = {s: two.cloud_.score_samples(X) for s, X in sets.items()}
            row = {"cifar100_auroc": auroc(cloud["ID"], cloud["CIFAR-100"]), "shares": {}}
            for share in args.shares:
                d = copy.deepcopy(two).set_params(edge_share=share)
                d.edge_.target_tpr, d.cloud_.target_tpr = d._stage_tprs()  # what fit would set for this share
                d.calibrate_threshold(Xte[cal])
                accepted = {s: (edge[s] >= d.edge_.offset_) & (cloud[s] >= d.cloud_.offset_) for s in sets}
                id_right = float(np.mean(accepted["ID"] & right_class))
                near = 1 - float(np.mean(accepted["CIFAR-100"]))
                far = 1 - float(np.mean([np.mean(accepted[s]) for s in FAR_OOD]))
                row["shares"][share] = {
                    "id_accepted": float(np.mean(accepted["ID"])), "near_rejected": near, "far_rejected": far,
                    "uploaded_near": float(np.mean(edge["CIFAR-100"] >= d.edge_.offset_)),
                    **{f"{kind} {f:g}": (1 - f) * id_right + f * rejected
                       for kind, rejected in (("near", near), ("far", far), ("mixed", (near + far) / 2))
                       for f in FRACTIONS}}
            results[name][method] = row
            clouds[method] = two.export_split()
        payload = clouds[METHODS[0]].edge(Xte[:32]).payload  # the same cut for both stages
        with torch.inference_mode():
            calls = {m: (lambda c=c: [c.cloud(payload) for _ in range(5)]) for m, c in clouds.items()}
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                best = interleaved(calls, rounds=args.rounds)
            finally:
                torch.set_num_threads(threads)
        for m in METHODS:
            results[name][m]["cloud_inputs_per_s"] = 5 * len(Xte[:32]) / best[m]
        print(f"{TITLES[name]}: " + "; ".join(
            f"{m} C100 AUROC {100 * r['cifar100_auroc']:.1f}, near 50% "
            + " / ".join(f"{100 * r['shares'][s]['near 0.5']:.1f}" for s in args.shares) for m, r in
            results[name].items()), flush=True)
    lines = [f"Command: `python benchmarks/bench_cloud_stage.py --data-dir <data>`; machine: {machine()['cpu']}", "",
             "Thresholds calibrated on half of the CIFAR-10 test subset (95% in all), reported on the other half "
             "and on CIFAR-100 (916 images) and the far-OOD sets. `edge_share` 0 is cloud only with that score. "
             "Streams: overall accuracy (%) at 10 / 30 / 50% OOD.", "",
             "Cloud part (batch 32, one thread) inputs/s, energy / energy + KNN: " + "; ".join(
                 f"{TITLES[n]} {r['energy']['cloud_inputs_per_s']:.0f} / {r['energy+knn']['cloud_inputs_per_s']:.0f} "
                 f"({r['energy+knn']['cloud_inputs_per_s'] / r['energy']['cloud_inputs_per_s']:.2f}x)"
                 for n, r in results.items()) + ".", "",
             "| model | cloud stage | C100 AUROC | edge_share | ID accepted | C100 rejected | far rejected | "
             "near stream | mixed stream | near: two-stage minus cloud only |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, by_method in results.items():
        for method, row in by_method.items():
            base = row["shares"][0.0]
            for share, r in row["shares"].items():
                gap = " / ".join(f"{100 * (r[f'near {f:g}'] - base[f'near {f:g}']):+.1f}" for f in FRACTIONS)
                lines.append(
                    f"| {TITLES[name]} | {method} | {100 * row['cifar100_auroc']:.1f} | {share:g} | "
                    f"{100 * r['id_accepted']:.1f} | {100 * r['near_rejected']:.1f} | {100 * r['far_rejected']:.1f} | "
                    + " / ".join(f"{100 * r[f'near {f:g}']:.1f}" for f in FRACTIONS) + " | "
                    + " / ".join(f"{100 * r[f'mixed {f:g}']:.1f}" for f in FRACTIONS) + " | "
                    + ("-" if share == 0 else gap) + " |")
    payload = {"machine": machine(), "args": vars(args),
               "models": {n: {m: {**r, "shares": {str(s): v for s, v in r["shares"].items()}} for m, r in by.items()}
                          for n, by in results.items()}}
    write_results(args.out, "\n".join(lines), payload)


if __name__ == "__main__":
    main()
