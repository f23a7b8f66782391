"""Exploration behind the detector's defaults, under the no-OOD protocol, on all development models.

    python benchmarks/explore_cache.py --data-dir ../shared/data --out /tmp/earlin_explore
    python benchmarks/explore_detector.py --cache /tmp/earlin_explore

The candidate configurations (pooled statistics, a Yeo-Johnson power
transform fitted on the ID features, free or with its lambdas clipped to
[0, 2], how many further taps inside the edge prefix join the detection
layer, channel selection, and the distance: Euclidean, Mahalanobis to one
centroid or to the class centroids) are listed in ``candidates()``. Each runs
through the package's own steps (``PowerTransformer`` -> ``ChannelSelector``
-> ``DistanceDetector``, as in ``ShallowFeatureOODDetector``) on cached
pooled features, and is scored twice:

- **choice** (ID data only): the mean, over the three models, of the mean
  AUROC over four ID-only kinds:

  - three synthetic kinds: fitted on the first 80% of the CIFAR-10 training
    subset, the held-out 20% against pseudo-OOD made from it (pixel shuffle,
    heavy blur, channel-matched noise; see ``earlin_sklearn.make_pseudo_ood``);
  - held-out classes: five folds, fold k fitted on the first 80% without
    classes 2k and 2k + 1, the held-out 20% of the other eight classes
    against the held-out 20% of those two.

  This column alone decides among the candidates (``--n-jobs`` runs them in
  parallel; the figures do not depend on it).
- **report**: fitted on the whole training subset; far-OOD mean AUROC / TNR at
  95% TPR over the real OOD sets, CIFAR-100 AUROC, and the accepted fraction
  of the CIFAR-10 test subset at the detector's own threshold. Printed beside
  the choice, never used for it.

How the candidate list itself came about (it was not blind) is told in
docs/benchmarks.rst. Writes results/explore/results.md and results.json.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from common import FAR_OOD, TITLES, machine, parse_args, smoke_data_dir, smoke_out  # noqa: E402

from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import PowerTransformer  # noqa: E402

from earlin_sklearn import ChannelSelector, DistanceDetector  # noqa: E402
from earlin_sklearn.metrics import auroc, tnr_at_tpr  # noqa: E402

PSEUDO = ["pseudo-shuffle", "pseudo-blur", "pseudo-noise"]


class UnboundedYeoJohnson(PowerTransformer):
    """Yeo-Johnson with each lambda clipped to [0, 2] after the maximum-likelihood fit.

    Outside that range the transform is bounded on one side (lambda < 0 caps
    positive inputs below -1/lambda, lambda > 2 caps negative ones), so an OOD
    value far beyond the ID range lands next to the bound. Clipping keeps both
    tails unbounded. A candidate of the grid, not a package default.
    """

    def _yeo_johnson_optimize(self, x):
        return float(np.clip(super()._yeo_johnson_optimize(x), 0.0, 2.0))


# name -> (DistanceDetector metric, class_conditional); listed from the simplest model to the richest
DISTANCES = {"euclidean": ("euclidean", False), "Mahalanobis, one centroid": ("mahalanobis", False),
             "Mahalanobis, class centroids": ("mahalanobis", True)}
DEFAULT_DISTANCE = "Mahalanobis, class centroids"

TRANSFORMS = {None: lambda: "passthrough", "yeo-johnson": PowerTransformer,
              "yeo-johnson, lambda in [0, 2]": UnboundedYeoJohnson}


class Cache:
    def __init__(self, path):
        self.z = np.load(path)  # allow_pickle=False: arrays only
        self.taps = [str(t) for t in self.z["taps"]]
        self.y = self.z["y_train"]
        self.n_fit = int(self.z["n_fit"])
        self.sets = sorted({k.split("|")[0] for k in self.z.files if "|" in k})
        self._recent = {}  # (set, taps, stats) -> stacked features, the last four asked for

    def feats(self, set_name, taps, stats):
        """Stacked features; a candidate's choice and report read the same training features three times, so
        the last few stackings are kept instead of read from the file again."""
        key = (set_name, tuple(taps), tuple(stats))
        if key not in self._recent:
            if len(self._recent) == 4:
                self._recent.pop(next(iter(self._recent)))  # the oldest
            self._recent[key] = np.hstack([self.z[f"{set_name}|{tap}|{s}"].astype(np.float64)
                                           for tap in taps for s in stats])
        return self._recent[key]


class ScoreFusion:
    """One detector per tap, each tap's score standardized on the ID fit data, averaged (the issue's
    "fusing the scores of every tap inside the edge prefix"). A candidate of the grid, not in the package;
    ``offset_`` is NaN (no out-of-fold threshold), so its test-TPR cell is empty."""

    def __init__(self, cfg, widths):
        self.cfg, self.widths = cfg, widths

    def _blocks(self, F):
        return np.split(F, np.cumsum(self.widths)[:-1], axis=1)

    def fit(self, F, y):
        blocks = self._blocks(F)
        self.parts_ = [fitted({**self.cfg, "fusion": False}, B, y) for B in blocks]
        fit_scores = [p.score_samples(B) for p, B in zip(self.parts_, blocks)]
        self.moments_ = [(s.mean(), s.std()) for s in fit_scores]
        self.offset_ = float("nan")
        return self

    def score_samples(self, F):
        return np.mean([(p.score_samples(B) - m) / sd
                        for p, B, (m, sd) in zip(self.parts_, self._blocks(F), self.moments_)], axis=0)


def fitted(cfg, F, y, threshold_cv=None):
    """``cfg``'s steps fitted on features ``F`` with labels ``y``: the package's own
    ``PowerTransformer`` -> ``ChannelSelector`` -> ``DistanceDetector``."""
    if cfg.get("fusion"):
        return ScoreFusion(cfg, cfg["widths"]).fit(F, y)
    metric, by_class = DISTANCES[cfg.get("distance", DEFAULT_DISTANCE)]
    steps = make_pipeline(
        TRANSFORMS[cfg["transform"]](),
        ChannelSelector(n_channels=cfg["select"], criterion="fisher"),
        # the threshold (report only) is the package's own: out-of-fold, offset_for_tpr
        DistanceDetector(metric=metric, class_conditional=by_class, threshold_cv=threshold_cv),
    )
    with np.errstate(over="ignore", invalid="ignore"):  # as the package's fit_power_transform
        return steps.fit(F, y)  # Fisher selection reads y; class_conditional=False ignores it


def _scores(steps, F_eval):
    with np.errstate(over="ignore", invalid="ignore"):
        return {k: steps.score_samples(v) for k, v in F_eval.items()}


def run_config(cache, cfg, split):
    """Scores of ``cfg`` on every evaluation set and its threshold, fitted on the ``fit`` part (choice) or
    on all training data (report)."""
    taps = _taps(cache, cfg)
    F_train = cache.feats("train", taps, cfg["stats"])
    if split == "choice":
        n = cache.n_fit
        F_eval = {"val": F_train[n:], **{k: cache.feats(k, taps, cfg["stats"]) for k in PSEUDO}}
    else:
        n = len(cache.y)
        F_eval = {k: cache.feats(k, taps, cfg["stats"])
                  for k in ["test"] + [s for s in cache.sets if s not in PSEUDO + ["train", "test"]]}
    steps = fitted(_with_widths(cache, cfg, taps), F_train[:n], cache.y[:n],
                   threshold_cv=None if split == "choice" else 5)
    return _scores(steps, F_eval), (steps.offset_ if cfg.get("fusion") else steps[-1].offset_)


def _taps(cache, cfg):
    """The detection layer and the cfg["taps"] blocks before it ("all": every tap in the prefix)."""
    return cache.taps if cfg["taps"] == "all" else cache.taps[-1 - cfg["taps"] :]


def _with_widths(cache, cfg, taps):
    """Score fusion needs each tap's feature count to split the stacked features again."""
    if not cfg.get("fusion"):
        return cfg
    return {**cfg, "widths": [cache.feats("train", [t], cfg["stats"]).shape[1] for t in taps]}


def held_out_classes(cache, cfg):
    """AUROC of ID against classes the detector never saw, per fold (ID data only).

    Fold k leaves out the classes {2k, 2k + 1}: fitted on the ``fit`` part without them, it scores the
    ``val`` part, whose other eight classes are ID and whose two left-out classes are the pseudo-OOD.
    Unlike the synthetic kinds, these are natural images from the same camera pipeline, so the AUROC
    is far from saturation and can rank distance families.
    """
    taps = _taps(cache, cfg)
    F, y, n = cache.feats("train", taps, cfg["stats"]), cache.y, cache.n_fit
    classes = np.unique(y)
    aurocs = []
    for k in range(len(classes) // 2):
        out = np.isin(y, classes[2 * k : 2 * k + 2])
        keep = ~out[:n]
        s = _scores(fitted(_with_widths(cache, cfg, taps), F[:n][keep], y[:n][keep]), {"val": F[n:]})["val"]
        aurocs.append(auroc(s[~out[n:]], s[out[n:]]))
    return aurocs


def evaluate(cache, cfg):
    ch, _ = run_config(cache, cfg, "choice")
    pseudo = {k: auroc(ch["val"], ch[k]) for k in PSEUDO}
    folds = held_out_classes(cache, cfg)
    rep, thr = run_config(cache, cfg, "report")
    far = {k: (auroc(rep["test"], rep[k]), tnr_at_tpr(rep["test"], rep[k])) for k in FAR_OOD}
    return {
        # the choice: four ID-only kinds, each weighted alike
        "choice": float(np.mean(list(pseudo.values()) + [np.mean(folds)])),
        "pseudo": float(np.mean(list(pseudo.values()))),
        "pseudo_by_kind": pseudo,
        "held_out_classes": float(np.mean(folds)),
        "held_out_classes_by_fold": folds,
        "far_auroc": float(np.mean([v[0] for v in far.values()])),
        "far_tnr95": float(np.mean([v[1] for v in far.values()])),
        "far": far,
        "cifar100_auroc": auroc(rep["test"], rep["CIFAR-100"]),
        "test_tpr": float(np.mean(rep["test"] >= thr)) if np.isfinite(thr) else None,  # None: no threshold
    }


_CACHES = {}


def evaluate_all(paths, cfg):
    """``evaluate`` on every model; each process opens a cache file once."""
    for path in paths.values():
        if path not in _CACHES:
            _CACHES[path] = Cache(path)
    return {m: evaluate(_CACHES[path], cfg) for m, path in paths.items()}


def candidates():
    """The candidate grid, then the issue's other directions on the default's remaining settings."""
    grid = [{"taps": extra, "stats": stats, "transform": transform, "select": select, "distance": distance}
            for stats in (("mean",), ("mean", "std"))
            for transform in TRANSFORMS
            for extra in (0, 1, 2)
            for select in ("all", 0.5)
            for distance in DISTANCES]
    base = {"transform": "yeo-johnson", "select": "all", "distance": DEFAULT_DISTANCE}
    richer = [{**base, "taps": extra, "stats": stats}  # higher moments, maxima, Gram matrices (Sastry & Oore)
              for stats in (("mean", "std", "skew"), ("mean", "std", "max"), ("gram",), ("mean", "std", "gram"))
              for extra in (0, 1)]
    # every block output inside the edge prefix (explore_cache.taps), one detector each
    fusion = [{**base, "taps": "all", "stats": ("mean", "std"), "fusion": True}]
    return grid + richer + fusion


TIE = 0.0005  # choice scores within 0.05 AUROC points of the best tie; the simplest of them is chosen


def complexity(cfg):
    """The order "simpler" follows among tied candidates: fewer statistics, no transform before a free one
    before a clipped one, fewer taps (score fusion last), all features before Fisher, then the distance in
    DISTANCES order (Euclidean, one centroid, class centroids)."""
    taps = 99 if cfg["taps"] == "all" else cfg["taps"]
    return (len(cfg["stats"]), list(TRANSFORMS).index(cfg["transform"]), taps, cfg["select"] != "all",
            list(DISTANCES).index(cfg.get("distance", DEFAULT_DISTANCE)))


def choose(rows, score):
    """The simplest candidate whose ``score(row)`` is within TIE of the best."""
    best = max(score(r) for r in rows)
    return min((r for r in rows if score(r) >= best - TIE), key=lambda r: complexity(r["cfg"]))


def label(cfg):
    sel = "all" if cfg["select"] == "all" else f"Fisher {cfg['select']}"
    taps = "score fusion of every tap" if cfg.get("fusion") else f"+{cfg['taps']} taps"
    return (f"{'+'.join(cfg['stats'])}, {cfg['transform'] or 'raw'}, {taps}, {sel}, "
            f"{cfg.get('distance', DEFAULT_DISTANCE)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/earlin_explore")
    p.add_argument("--models", nargs="+", default=list(TITLES))
    p.add_argument("--filter", default=None, help="only candidates whose label contains this")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "explore"))
    p.add_argument("--n-jobs", type=int, default=1, help="candidates evaluated in parallel (joblib)")
    args = parse_args(p, argv, "explore", models=["resnet20"])
    if args.smoke:  # a cache of the synthetic data, and a few candidates
        import explore_cache

        args.cache = smoke_out("explore_cache")
        explore_cache.main(["--data-dir", smoke_data_dir(), "--models", "resnet20", "--max-ood", "16", "--out", args.cache])
        args.filter = args.filter or "mean+std, yeo-johnson, +1 taps, all"
    rows = []
    cfgs = [cfg for cfg in candidates() if not args.filter or args.filter in label(cfg)]
    paths = {m: str(Path(args.cache) / f"{m}.npz") for m in args.models}
    results = Parallel(n_jobs=args.n_jobs, return_as="generator")(
        delayed(evaluate_all)(paths, cfg) for cfg in cfgs)
    for cfg, res in zip(cfgs, results):
        row = {"config": label(cfg), "cfg": cfg, "per_model": res,
               **{f"{k}_mean": float(np.mean([r[k] for r in res.values()]))
                  for k in ("choice", "pseudo", "held_out_classes")}}
        rows.append(row)
        print(f"{row['config']:<40} choice {100 * row['choice_mean']:.2f} | " + " | ".join(
            f"{m}: far {100 * r['far_auroc']:.1f}/{100 * r['far_tnr95']:.1f} c100 {100 * r['cifar100_auroc']:.1f} "
            f"tpr {100 * (r['test_tpr'] or 0):.1f} ps {100 * r['pseudo']:.2f} hoc {100 * r['held_out_classes']:.2f}"
            for m, r in res.items()), flush=True)
    rows.sort(key=lambda r: -r["choice_mean"])

    def report(x):
        tpr = "n/a" if x["test_tpr"] is None else f"{100 * x['test_tpr']:.1f}"
        return f"{100 * x['far_auroc']:.1f} / {100 * x['far_tnr95']:.1f}, {100 * x['cifar100_auroc']:.1f}, {tpr}"

    head = ("| configuration (statistics, transform, extra taps, selection, distance) | choice: mean of the four "
            "ID-only kinds | synthetic pseudo-OOD (3 kinds) | held-out classes | "
            + " | ".join(f"{TITLES[m]}: far AUROC / TNR@95, CIFAR-100, test TPR (report)" for m in args.models) + " |")
    lines = ["Command: `python benchmarks/explore_cache.py --data-dir <data>` then "
             "`python benchmarks/explore_detector.py`; machine: " + machine()["cpu"], "",
             "Sorted by the choice column (ID data only, mean AUROC in % over the three models). The chosen "
             "candidate is the simplest within 0.05 points of the best (`complexity()` in the script). The "
             "report columns use the real OOD sets and were not used to choose.", "", head,
             "|---" * (4 + len(args.models)) + "|"]
    chosen = choose(rows, lambda r: r["choice_mean"]) if rows else None
    for r in rows:
        name = f"**{r['config']} (chosen)**" if r is chosen else r["config"]
        lines.append(f"| {name} | {100 * r['choice_mean']:.2f} | {100 * r['pseudo_mean']:.2f} | "
                     f"{100 * r['held_out_classes_mean']:.2f} | "
                     + " | ".join(report(x) for x in r["per_model"].values()) + " |")
    if len(rows) > 2:
        # report only, after the choice: how each ID-only column orders the candidates by real far-OOD AUROC
        far = [np.mean([x["far_auroc"] for x in r["per_model"].values()]) for r in rows]
        rho = {k: spearmanr([r[f"{k}_mean"] for r in rows], far)[0] for k in ("pseudo", "held_out_classes", "choice")}
        lines += ["", f"Spearman correlation, over these {len(rows)} candidates, of each ID-only column with the mean "
                  f"far-OOD AUROC over the models (report only): synthetic kinds {rho['pseudo']:.2f}, held-out "
                  f"classes {rho['held_out_classes']:.2f}, the choice {rho['choice']:.2f}."]
    if len(args.models) > 1 and rows:
        # what a user would get by running the same choice on their own model alone
        lines += ["", "Chosen per model (the same rule on that model's ID data alone) against the "
                  "configuration chosen on all models:", "",
                  "| model | chosen on this model alone | its report | chosen on all models: report |",
                  "|---|---|---|---|"]
        for m in args.models:
            best = choose(rows, lambda r: r["per_model"][m]["choice"])
            lines.append(f"| {TITLES[m]} | {best['config']} | {report(best['per_model'][m])} | "
                         f"{report(chosen['per_model'][m])} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(
        [{**r, "chosen": r is chosen} for r in rows], indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
