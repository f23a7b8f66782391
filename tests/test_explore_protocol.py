"""The benchmark that chose the detector's defaults (benchmarks/explore_detector.py) never reads OOD data
when it chooses: its choice scores do not move when every OOD and test array changes, and the arrays it
reads for them are the ID training subset and pseudo-OOD made from it."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
explore = pytest.importorskip("explore_detector")
common = pytest.importorskip("common")

TAPS = ["stem", "block.0", "block.1", "block.2"]
STATS = {"mean": 4, "std": 4, "skew": 4, "max": 4, "gram": 10}
REPORT_SETS = ["test", *common.FAR_OOD, "CIFAR-100"]


def _cache(tmp_path, name, ood_shift, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(300) % 10
    arrays = {"y_train": y, "y_test": np.arange(60) % 10, "n_fit": np.array(240), "taps": np.array(TAPS)}
    for set_name, n in [("train", 300), *[(k, 60) for k in explore.PSEUDO], *[(k, 60) for k in REPORT_SETS]]:
        shift = ood_shift if set_name in REPORT_SETS else 0.0
        for tap in TAPS:
            for stat, width in STATS.items():
                base = np.random.default_rng(seed + len(set_name)).normal(size=(n, width))
                if set_name == "train":
                    base = base + 0.5 * np.eye(10, width)[y] + rng.normal(scale=0.01, size=(n, width))
                arrays[f"{set_name}|{tap}|{stat}"] = (base + shift).astype(np.float32)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return explore.Cache(path)


CONFIGS = [
    {"taps": 1, "stats": ("mean", "std"), "transform": "yeo-johnson", "select": "all",
     "distance": "Mahalanobis, class centroids"},
    {"taps": 0, "stats": ("mean",), "transform": None, "select": 0.5, "distance": "euclidean"},
    {"taps": "all", "stats": ("mean", "std"), "transform": "yeo-johnson", "select": "all",
     "distance": "Mahalanobis, class centroids", "fusion": True},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[explore.label(c) for c in CONFIGS])
def test_choice_scores_do_not_depend_on_ood_or_test_data(tmp_path, cfg):
    with np.errstate(all="ignore"):
        a = explore.evaluate(_cache(tmp_path, "a", ood_shift=0.0), cfg)
        b = explore.evaluate(_cache(tmp_path, "b", ood_shift=3.0), cfg)
    assert a["far_auroc"] != b["far_auroc"]  # the report does read the OOD sets...
    for key in ("choice", "pseudo", "held_out_classes"):  # ...the choice does not
        assert a[key] == b[key]
    assert a["pseudo_by_kind"] == b["pseudo_by_kind"] and a["held_out_classes_by_fold"] == b["held_out_classes_by_fold"]


def test_choice_reads_only_the_training_subset_and_pseudo_ood(tmp_path, monkeypatch):
    cache = _cache(tmp_path, "a", ood_shift=0.0)
    read = []
    real = explore.Cache.feats

    def traced(self, set_name, taps, stats):
        read.append(set_name)
        return real(self, set_name, taps, stats)

    monkeypatch.setattr(explore.Cache, "feats", traced)
    with np.errstate(all="ignore"):
        for cfg in CONFIGS:
            explore.run_config(cache, cfg, "choice")
            explore.held_out_classes(cache, cfg)
    assert set(read) == {"train", "pseudo-shuffle", "pseudo-blur", "pseudo-noise"}


def test_the_rule_takes_the_simplest_candidate_within_the_tie():
    rows = [{"cfg": CONFIGS[0], "choice_mean": 0.8882}, {"cfg": {**CONFIGS[0], "stats": ("mean",)},
                                                         "choice_mean": 0.8880},
            {"cfg": CONFIGS[1], "choice_mean": 0.8870}]
    assert explore.choose(rows, lambda r: r["choice_mean"]) is rows[1]  # fewer statistics, within 0.05 points
    rows[1]["choice_mean"] = 0.8870
    assert explore.choose(rows, lambda r: r["choice_mean"]) is rows[0]  # outside the tie: the best
