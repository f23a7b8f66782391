"""Two-stage detection on the real OOD sets: what the edge rejects, what the cloud rejects, what is lost.

    python benchmarks/bench_two_stage.py --data-dir ../shared/data

For each development model: the default EARLIN detector alone (target TPR
95%), the energy detector alone (the cloud stage alone, 95%), and the
TwoStageDetector (overall 95%: each stage 97.47%), all fitted on the CIFAR-10
train subset only. Reported on the CIFAR-10 test subset (ID accepted) and on
every OOD set: the share rejected on the edge, in the cloud, and in all.

Then the thresholds again, set by ``calibrate_threshold`` on a fixed random
half of the CIFAR-10 test subset (ID images the backbone was not trained
on): the share of the other half accepted, against the thresholds from the
training subset, and what each rejects of CIFAR-100 and of the far-OOD sets.

Last, how the budget split moves things: for each ``edge_share`` in
``--shares``, the two-stage detector with the edge at ``target_tpr **
edge_share``, calibrated on the same held-out half (the fitted statistics do
not depend on the budget, so a copy with the stages' ``target_tpr`` set is
the detector ``TwoStageDetector(edge_share=...)`` would fit). Reported: ID
accepted, and for ID, CIFAR-100 and the far-OOD sets the share the edge
uploads and the share rejected in all. A report for choosing ``edge_share``
by the deployment's expected mix, not a choice.
"""

import copy

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import (parse_args, FAR_OOD, MODELS, NEAR_OOD, TITLES, calibration_split, first_stage, load_model,  # noqa: E402
                    load_sets, machine, write_results)

from earlin_sklearn import ShallowFeatureOODDetector, TwoStageDetector  # noqa: E402
from earlin_sklearn.baselines import LogitDetector  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--max-ood", type=int, default=1000)
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "two_stage"))
    args = parse_args(p, argv, "two_stage", models=["resnet20"], max_ood=16, shares=[0.5])
    id_set = "CIFAR-10 test (ID)"
    sets = [id_set, *NEAR_OOD, *FAR_OOD]
    lines = [f"Command: `python benchmarks/bench_two_stage.py --data-dir <data>`; machine: {machine()['cpu']}", "",
             "Share of each set rejected (%); for ID, the share accepted. Edge / cloud / in all for the two-stage "
             "detector.", ""]
    results = {}
    for name in args.models:
        (Xtr, ytr), (Xte, _), ood = load_sets(args.data_dir, max_ood=args.max_ood, n_noise=args.max_ood, model=name)
        model = load_model(args.data_dir, name)
        y = ytr.numpy()
        layer = first_stage(name)
        edge_only = ShallowFeatureOODDetector(model, layer, batch_size=256, device="cpu").fit(Xtr, y)
        energy = LogitDetector(model, "energy", batch_size=256, device="cpu").fit(Xtr)
        two = TwoStageDetector(ShallowFeatureOODDetector(model, layer, batch_size=256, device="cpu")).fit(Xtr, y)
        rows = {}
        for set_name in sets:
            X = Xte if set_name == id_set else ood[set_name]
            e_ok, c_ok = two.edge_.predict(X) == 1, two.cloud_.predict(X) == 1
            rows[set_name] = {
                "earlin_only": float(np.mean(edge_only.predict(X) == -1)),
                "energy_only": float(np.mean(energy.predict(X) == -1)),
                "two_stage_edge": float(np.mean(~e_ok)),
                "two_stage_cloud": float(np.mean(e_ok & ~c_ok)),
                "two_stage_all": float(np.mean(~(e_ok & c_ok))),
            }
        results[name] = rows
        cal, held = calibration_split(len(Xte))
        calibrated = {}
        for label, det in (("EARLIN alone", edge_only), ("energy alone", energy), ("two-stage", two)):
            for thresholds, d in (("training subset", det),
                                  ("held-out ID (calibrate_threshold)",
                                   copy.deepcopy(det).calibrate_threshold(Xte[cal]))):
                calibrated[f"{label}, {thresholds}"] = {
                    "id_accepted": float(np.mean(d.predict(Xte[held]) == 1)),
                    "cifar100_rejected": float(np.mean(d.predict(ood[NEAR_OOD[0]]) == -1)),
                    "far_rejected": float(np.mean([np.mean(d.predict(ood[s]) == -1) for s in FAR_OOD])),
                }
        results[name + " calibration"] = calibrated
        shares = {}
        for share in args.shares:
            d = copy.deepcopy(two).set_params(edge_share=share)
            d.edge_.target_tpr, d.cloud_.target_tpr = d._stage_tprs()  # the split fit would make
            d.calibrate_threshold(Xte[cal])

            def shares_of(X):
                e_ok = d.edge_.predict(X) == 1
                return float(np.mean(e_ok)), float(np.mean(~(e_ok & (d.cloud_.predict(X) == 1))))

            far = np.array([shares_of(ood[s]) for s in FAR_OOD]).mean(axis=0)
            shares[share] = {"id": shares_of(Xte[held]), "cifar100": shares_of(ood[NEAR_OOD[0]]),
                             "far": tuple(float(v) for v in far)}
        results[name + " edge_share"] = {str(k): v for k, v in shares.items()}
        lines += [f"**{TITLES[name]}** (edge at `{layer}`)", "",
                  "| set | EARLIN alone | energy alone (cloud only) | two-stage: edge | two-stage: cloud | "
                  "two-stage: in all |", "|---|---|---|---|---|---|"]
        for set_name, r in rows.items():
            if set_name == id_set:
                lines.append(f"| {set_name}: accepted | {100 * (1 - r['earlin_only']):.1f} | "
                             f"{100 * (1 - r['energy_only']):.1f} | - | - | {100 * (1 - r['two_stage_all']):.1f} |")
            else:
                lines.append(f"| {set_name} | {100 * r['earlin_only']:.1f} | {100 * r['energy_only']:.1f} | "
                             f"{100 * r['two_stage_edge']:.1f} | {100 * r['two_stage_cloud']:.1f} | "
                             f"{100 * r['two_stage_all']:.1f} |")
        lines += ["", f"Thresholds from the training subset or calibrated on {len(cal)} held-out CIFAR-10 test "
                  f"images; ID accepted on the other {len(held)} (target 95%), rejected (%) of CIFAR-100 and, "
                  "mean over the far-OOD sets:", "",
                  "| detector, thresholds | ID accepted | CIFAR-100 rejected | far OOD rejected (mean) |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {100 * r['id_accepted']:.1f} | {100 * r['cifar100_rejected']:.1f} | "
                  f"{100 * r['far_rejected']:.1f} |" for k, r in calibrated.items()]
        lines += ["", f"The budget split, calibrated on the same {len(cal)} images (95% in all); uploaded: accepted by "
                  "the edge; rejected: by either stage (%):", "",
                  "| edge_share | edge TPR | ID accepted | ID uploaded | CIFAR-100 uploaded / rejected | "
                  "far OOD uploaded / rejected (mean) |", "|---|---|---|---|---|---|"]
        lines += [f"| {k:g} | {100 * two.target_tpr ** k:.1f} | {100 * (1 - r['id'][1]):.1f} | "
                  f"{100 * r['id'][0]:.1f} | {100 * r['cifar100'][0]:.1f} / {100 * r['cifar100'][1]:.1f} | "
                  f"{100 * r['far'][0]:.1f} / {100 * r['far'][1]:.1f} |" for k, r in shares.items()]
        lines.append("")
        print("\n".join(lines[-len(rows) - len(calibrated) - len(shares) - 13:]), flush=True)
    write_results(args.out, "\n".join(lines), {"machine": machine(), "results": results}, show=False)


if __name__ == "__main__":
    main()
