"""Exploration behind the detector's defaults, under the no-OOD protocol, on all development models.

    python benchmarks/explore_cache.py --data-dir ../shared/data --out /tmp/earlin_explore
    python benchmarks/explore_detector.py --cache /tmp/earlin_explore

Every candidate configuration (pooled statistics, a Yeo-Johnson power
transform fitted on the ID features, how many further taps inside the edge
prefix join the detection layer, channel selection) is listed in
``candidates()`` before anything is measured. (An earlier, wider round on the
same protocol -- score fusion of all taps, Gram matrices, max and skewness,
a 2x2 spatial grid, min/max deviations -- lost to these on the choice column;
its code is the ``fusion``/``stats`` options kept below.) Each is scored twice:

- **choice** (ID data only): fitted on the first 80% of the CIFAR-10 training
  subset; the pseudo-OOD AUROC of the held-out 20% against pseudo-OOD made
  from it (pixel shuffle, heavy blur, channel-matched noise; see
  ``earlin_sklearn.make_pseudo_ood``), averaged over the three models, ranks the
  candidates. This column alone decides the defaults.
- **report**: fitted on the whole training subset; far-OOD mean AUROC / TNR at
  95% TPR over the real OOD sets, CIFAR-100 AUROC, and the accepted fraction
  of the CIFAR-10 test subset. Printed beside the choice, never used for it.

Writes results/explore/results.md and results.json.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import FAR_OOD, TITLES, machine  # noqa: E402

from sklearn.preprocessing import PowerTransformer  # noqa: E402

from earlin_sklearn import ChannelSelector, DistanceDetector  # noqa: E402
from earlin_sklearn.metrics import auroc, tnr_at_tpr  # noqa: E402

PSEUDO = ["pseudo-shuffle", "pseudo-blur", "pseudo-noise"]


class Cache:
    def __init__(self, path):
        self.z = np.load(path)
        self.taps = [str(t) for t in self.z["taps"]]
        self.y = self.z["y_train"]
        self.n_fit = int(self.z["n_fit"])
        self.sets = sorted({k.split("|")[0] for k in self.z.files if "|" in k})

    def feats(self, set_name, tap, stats):
        return np.hstack([self.z[f"{set_name}|{tap}|{s}"].astype(np.float64) for s in stats])


def tap_scores(F_fit, y, F_eval, metric, class_conditional, cv=5):
    """Fit one tap's distance detector; return eval scores and out-of-fold ID scores (for standardizing)."""
    det = DistanceDetector(metric=metric, class_conditional=class_conditional, threshold_cv=None)
    det.fit(F_fit, y if class_conditional else None)
    out = {k: det.score_samples(v) for k, v in F_eval.items()}
    oof = np.empty(len(F_fit))
    folds = np.arange(len(F_fit)) % cv
    for f in range(cv):
        d = DistanceDetector(metric=metric, class_conditional=class_conditional, threshold_cv=None)
        d.fit(F_fit[folds != f], y[folds != f] if class_conditional else None)
        oof[folds == f] = d.score_samples(F_fit[folds == f])
    return out, oof


def prepare(cfg, F_fit, y, F_eval):
    """The configuration's power transform and channel selection, fitted on ``F_fit`` (ID) only."""
    if cfg.get("transform") == "yeo-johnson":
        pt = PowerTransformer().fit(F_fit)
        F_fit, F_eval = pt.transform(F_fit), {k: pt.transform(v) for k, v in F_eval.items()}
    if cfg.get("select", "all") != "all":
        sel = ChannelSelector(n_channels=cfg["select"], criterion="fisher").fit(F_fit, y)
        F_fit, F_eval = sel.transform(F_fit), {k: sel.transform(v) for k, v in F_eval.items()}
    return F_fit, F_eval


def run_config(cache, cfg, split):
    """Scores of ``cfg`` on every evaluation set, fitted on the ``fit`` part (choice) or all training data (report)."""
    if isinstance(cfg["taps"], int):  # the detection layer and the cfg["taps"] blocks before it
        taps = cache.taps[-1 - cfg["taps"] :]
    else:
        taps = cache.taps if cfg["taps"] == "all" else cache.taps[1:] if cfg["taps"] == "blocks" else cache.taps[-1:]
    n = cache.n_fit if split == "choice" else len(cache.y)
    eval_sets = (["val"] + PSEUDO) if split == "choice" else ["test"] + [s for s in cache.sets if s not in PSEUDO + ["train", "test"]]

    def get(set_name, tap):
        if set_name == "val":
            return cache.feats("train", tap, cfg["stats"])[cache.n_fit :]
        return cache.feats(set_name, tap, cfg["stats"])

    y = cache.y[:n]
    per_tap, oofs = [], []
    if cfg["fusion"] == "concat":
        F_fit = np.hstack([cache.feats("train", t, cfg["stats"])[:n] for t in taps])
        F_eval = {s: np.hstack([get(s, t) for t in taps]) for s in eval_sets}
        F_fit, F_eval = prepare(cfg, F_fit, y, F_eval)
        out, oof = tap_scores(F_fit, y, F_eval, cfg["metric"], cfg["cc"])
        return out, oof
    for t in taps:
        F_fit = cache.feats("train", t, cfg["stats"])[:n]
        out, oof = tap_scores(F_fit, y, {s: get(s, t) for s in eval_sets}, cfg["metric"], cfg["cc"])
        per_tap.append(out)
        oofs.append(oof)
    # standardize each tap's score by its out-of-fold ID scores, then combine
    z = [{s: (o[s] - oof.mean()) / oof.std() for s in eval_sets} for o, oof in zip(per_tap, oofs)]
    z_oof = [(oof - oof.mean()) / oof.std() for oof in oofs]
    comb = np.mean if cfg["fusion"] == "mean" else np.min
    return ({s: comb([zz[s] for zz in z], axis=0) for s in eval_sets}, comb(z_oof, axis=0))


def evaluate(cache, cfg):
    ch, oof_c = run_config(cache, cfg, "choice")
    pseudo = {k: auroc(ch["val"], ch[k]) for k in PSEUDO}
    rep, oof = run_config(cache, cfg, "report")
    thr = np.quantile(oof, 0.05)
    far = {k: (auroc(rep["test"], rep[k]), tnr_at_tpr(rep["test"], rep[k])) for k in FAR_OOD}
    return {
        "pseudo": float(np.mean(list(pseudo.values()))),
        "pseudo_by_kind": pseudo,
        "far_auroc": float(np.mean([v[0] for v in far.values()])),
        "far_tnr95": float(np.mean([v[1] for v in far.values()])),
        "far": far,
        "cifar100_auroc": auroc(rep["test"], rep["CIFAR-100"]),
        "test_tpr": float(np.mean(rep["test"] >= thr)),
    }


def candidates():
    """The candidate grid, fixed before any measurement."""
    out = []
    for stats in (("mean",), ("mean", "std")):
        for transform in (None, "yeo-johnson"):
            for extra in (0, 1, 2):
                for select in ("all", 0.5):
                    out.append({"taps": extra, "stats": stats, "transform": transform, "select": select,
                                "fusion": "concat", "metric": "mahalanobis", "cc": True})
    return out


def label(cfg):
    taps = f"+{cfg['taps']} taps" if isinstance(cfg["taps"], int) else f"{cfg['taps']} {cfg['fusion']}"
    sel = "all" if cfg.get("select", "all") == "all" else f"Fisher {cfg['select']}"
    return f"{'+'.join(cfg['stats'])}, {cfg.get('transform') or 'raw'}, {taps}, {sel}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/earlin_explore")
    p.add_argument("--models", nargs="+", default=list(TITLES))
    p.add_argument("--filter", default=None, help="only candidates whose label contains this")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "explore"))
    args = p.parse_args(argv)
    caches = {m: Cache(Path(args.cache) / f"{m}.npz") for m in args.models}
    rows = []
    for cfg in candidates():
        if args.filter and args.filter not in label(cfg):
            continue
        res = {m: evaluate(c, cfg) for m, c in caches.items()}
        row = {"config": label(cfg), "cfg": cfg, "per_model": res,
               "pseudo_mean": float(np.mean([r["pseudo"] for r in res.values()]))}
        rows.append(row)
        print(f"{row['config']:<40} pseudo {100 * row['pseudo_mean']:.2f} | " + " | ".join(
            f"{m}: far {100 * r['far_auroc']:.1f}/{100 * r['far_tnr95']:.1f} c100 {100 * r['cifar100_auroc']:.1f} "
            f"tpr {100 * r['test_tpr']:.1f} ps {100 * r['pseudo']:.1f}" for m, r in res.items()), flush=True)
    rows.sort(key=lambda r: -r["pseudo_mean"])
    head = ("| configuration (statistics, transform, extra taps, selection) | pseudo-OOD AUROC, mean (choice) | "
            + " | ".join(f"{TITLES[m]}: far AUROC / TNR@95, CIFAR-100, test TPR (report)" for m in args.models) + " |")
    lines = ["Command: `python benchmarks/explore_cache.py --data-dir <data>` then "
             "`python benchmarks/explore_detector.py`; machine: " + machine()["cpu"], "",
             "Sorted by the choice column (ID data and pseudo-OOD only). The report columns use the real OOD sets "
             "and were not used to choose.", "", head, "|---" * (2 + len(args.models)) + "|"]
    for r in rows:
        lines.append(f"| {r['config']} | {100 * r['pseudo_mean']:.2f} | " + " | ".join(
            f"{100 * x['far_auroc']:.1f} / {100 * x['far_tnr95']:.1f}, {100 * x['cifar100_auroc']:.1f}, "
            f"{100 * x['test_tpr']:.1f}" for x in r["per_model"].values()) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
