"""Mixed precision for feature extraction: its effect on scores, decisions and detection, per model.

    python benchmarks/bench_precision.py --data-dir ../shared/data
    python benchmarks/bench_precision.py --data-dir ../shared/data --device cuda --precisions bfloat16 float16

For each development model, the default detector is fitted in float32 and
with ``precision=`` each reduced precision (``torch.autocast``), on the
CIFAR-10 train subset; each scores the CIFAR-10 test subset and the far-OOD
sets. Reported: the largest score difference against float32 (in units of
the float32 ID score spread), the share of decisions that differ, the ID
acceptance, the mean far-OOD AUROC, and the feature-extraction time as a
ratio to float32 in the same run. On a CPU, autocast runs bfloat16 (and
float16) kernels that may be slower than float32: the speed column is only
meaningful on the device the detector will fit on.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_args, FAR_OOD, MODELS, TITLES, first_stage, load_model, load_sets, machine, write_results  # noqa: E402

from earlin_sklearn import ShallowFeatureOODDetector  # noqa: E402
from earlin_sklearn.metrics import auroc  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=["bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-ood", type=int, default=500)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision"))
    args = parse_args(p, argv, "precision", models=["resnet20"], max_ood=16)
    rows = []
    for name in args.models:
        (Xtr, ytr), (Xte, _), ood = load_sets(args.data_dir, max_ood=args.max_ood, n_noise=args.max_ood, model=name)
        model = load_model(args.data_dir, name)
        runs = {}
        for precision in ["float32", *args.precisions]:
            det = ShallowFeatureOODDetector(model, first_stage(name), device=args.device, precision=precision)
            det.fit(Xtr, ytr)
            t0 = time.perf_counter()
            s_id = det.score_samples(Xte)
            seconds = time.perf_counter() - t0
            s_ood = {k: det.score_samples(ood[k]) for k in FAR_OOD}
            runs[precision] = (det, s_id, s_ood, seconds)
        ref_det, ref_id, ref_ood, ref_s = runs["float32"]
        spread = float(np.std(ref_id))
        for precision, (det, s_id, s_ood, seconds) in runs.items():
            all_ref = np.concatenate([ref_id, *ref_ood.values()])
            all_new = np.concatenate([s_id, *s_ood.values()])
            finite = np.isfinite(all_ref) & np.isfinite(all_new)
            ref_dec = np.concatenate([ref_id >= ref_det.offset_, *[v >= ref_det.offset_ for v in ref_ood.values()]])
            new_dec = np.concatenate([s_id >= det.offset_, *[v >= det.offset_ for v in s_ood.values()]])
            row = {
                "model": name, "precision": precision,
                "max_score_diff_in_id_std": float(np.max(np.abs(all_new[finite] - all_ref[finite])) / spread),
                "decisions_changed": float(np.mean(ref_dec != new_dec)),
                "id_accepted": float(np.mean(s_id >= det.offset_)),
                "far_auroc": float(np.mean([auroc(s_id, s_ood[k]) for k in FAR_OOD])),
                "time_ratio": seconds / ref_s,
            }
            rows.append(row)
            print(f"{TITLES[name]:18s} {precision:9s} max |score diff| {row['max_score_diff_in_id_std']:.2e} ID std  "
                  f"decisions changed {100 * row['decisions_changed']:.2f}%  ID accepted {100 * row['id_accepted']:.1f}%  "
                  f"far AUROC {100 * row['far_auroc']:.1f}  time x{row['time_ratio']:.2f}", flush=True)
    lines = [f"Command: `python benchmarks/bench_precision.py --data-dir <data> --device {args.device}`; "
             f"machine: {machine()['cpu']}", "",
             "| model | precision | max score difference (x ID score std) | decisions changed | ID test accepted | "
             "far-OOD AUROC | scoring time vs float32 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {TITLES[r['model']]} | {r['precision']} | {r['max_score_diff_in_id_std']:.1e} | "
                     f"{100 * r['decisions_changed']:.2f}% | {100 * r['id_accepted']:.1f}% | {100 * r['far_auroc']:.1f} | "
                     f"{r['time_ratio']:.2f} |")
    write_results(args.out, "\n".join(lines), {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
