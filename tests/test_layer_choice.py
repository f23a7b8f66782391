import numpy as np
import pytest
import torch

from earlin_sklearn import recommend_layer

from .conftest import make_images, make_tiny_cnn


def test_recommendation_respects_the_budget_and_leaves_the_model_alone():
    net = make_tiny_cnn().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    X, y = make_images(60)
    rec = recommend_layer(net, X, y, layers=["stem", "layer1", "layer2"], max_edge_flops=0.5, n_channels=("auto", 4))
    assert rec.layer == "stem"  # the only candidate under 50% of the FLOPs
    assert {r["layer"] for r in rec.table} == {"stem"} and len(rec.table) == 2
    assert all(0 < r["edge_flops"] <= 0.5 and 0 <= r["pseudo_auroc"] <= 1 for r in rec.table)
    assert "<- recommended" in str(rec)
    # the candidates the budget left out are named, with their FLOPs share, not silently dropped
    assert [r["layer"] for r in rec.over_budget] == ["layer1", "layer2"]
    assert all(r["edge_flops"] > 0.5 for r in rec.over_budget)
    assert "over the edge budget, not fitted: layer1 (" in str(rec)
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_ties_go_to_the_cheaper_layer_and_budgets_narrow_the_table():
    X, y = make_images(60)
    rec = recommend_layer(make_tiny_cnn(), X, y, layers=["stem", "layer1"], max_edge_flops=1.0, tolerance=1.0)
    assert rec.layer == "stem"
    from earlin_sklearn import ShallowFeatureOODDetector
    # the recommended params are the detector's defaults but the layer: the same fit as ShallowFeatureOODDetector(m, layer)
    assert rec.params["n_channels"] == ShallowFeatureOODDetector(None, "stem").n_channels
    strict = recommend_layer(make_tiny_cnn(), X, y, layers=["stem", "layer1"], max_edge_flops=1.0, tolerance=0.0)
    best = max(r["pseudo_auroc"] for r in strict.table)
    assert next(r for r in strict.table if r["layer"] == strict.layer)["pseudo_auroc"] == best
    narrow = strict.within(0.5)
    assert narrow.layer == "stem" and {r["layer"] for r in narrow.table} == {"stem"}
    assert [r["layer"] for r in narrow.over_budget] == ["layer1"]


def test_nothing_within_budget_is_a_clear_error():
    X, _ = make_images(30)
    with pytest.raises(ValueError, match="No candidate layer runs within 1%"):
        recommend_layer(make_tiny_cnn(), X, layers=["layer1"], max_edge_flops=0.01)


def test_pick_one_standard_error_rule():
    from earlin_sklearn._layer_choice import pick

    table = [
        {"layer": "a", "n_channels": "auto", "edge_flops": 0.1, "pseudo_auroc": 0.9950, "pseudo_auroc_se": 0.0010},
        {"layer": "b", "n_channels": "auto", "edge_flops": 0.2, "pseudo_auroc": 0.9990, "pseudo_auroc_se": 0.0002},
        {"layer": "c", "n_channels": "auto", "edge_flops": 0.3, "pseudo_auroc": 0.9993, "pseudo_auroc_se": 0.0004},
    ]
    assert pick(table, 1.0, "se")["layer"] == "b"  # within one SE of c's score (0.9989): the cheaper b
    assert pick(table, 1.0, 0.005)["layer"] == "a"  # a fixed 0.5-point tolerance lumps in a 5x larger error
    assert pick(table, 1.0, 0.0)["layer"] == "c"
    assert pick(table, 0.25, "se")["layer"] == "b"
    with pytest.raises(ValueError, match="No candidate"):
        pick(table, 0.05)


def test_one_pass_scores_equal_a_grid_search_refit_per_candidate():
    """The one-pass recommendation fits the detector's own steps on shared features: its per-candidate scores
    equal GridSearchCV's refits of ShallowFeatureOODDetector (same folds, same pseudo-OOD images)."""
    from sklearn.model_selection import GridSearchCV

    from earlin_sklearn import ShallowFeatureOODDetector, make_pseudo_ood_scorer
    from earlin_sklearn.models import cifar_resnet

    torch.manual_seed(0)
    net = cifar_resnet(20).eval()
    X = torch.randn(90, 3, 32, 32).numpy()
    y = np.arange(90) % 3
    layers = ["relu", "layer1.0", "layer1", "layer1.2"]
    rec = recommend_layer(net, X, y, layers=layers, max_edge_flops=0.6, cv=3)
    search = GridSearchCV(ShallowFeatureOODDetector(net, "relu"), {"layer": layers},
                          scoring=make_pseudo_ood_scorer(per_image="one"), cv=3, refit=False).fit(X, y)
    old = dict(zip([p["layer"] for p in search.cv_results_["params"]], search.cv_results_["mean_test_score"]))
    for row in rec.table:
        assert row["pseudo_auroc"] == pytest.approx(old[row["layer"]], abs=1e-3)
    by_layer = {r["layer"]: r["pseudo_auroc"] for r in rec.table}
    assert by_layer["layer1"] == by_layer["layer1.2"]  # the same tensor: computed once


def test_one_pass_pools_a_tap_before_a_later_in_place_op():
    """A norm followed by ReLU(inplace=True): the norm's tap holds its own output, not the ReLU's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
                              torch.nn.Conv2d(4, 4, 3)).eval()
    X = torch.randn(60, 3, 12, 12).numpy()
    rec = recommend_layer(net, X, layers=["1", "2"], max_edge_flops=1.0, cv=2)
    scores = {r["layer"]: r["pseudo_auroc"] for r in rec.table}
    assert scores["1"] != scores["2"]


@pytest.mark.parametrize("make", ["cifar_resnet20", "shufflenet_v2_x0_5", "mobilenet_v3_small"])
def test_prefix_flops_from_one_pass_equal_each_split_prefix(make):
    """The FLOPs run when a layer first returns (one pass for every candidate) are its split prefix's FLOPs."""
    import torchvision

    from earlin_sklearn._cost import flops_at_returns
    from earlin_sklearn._layer_choice import default_candidates, prefix_flops_share
    from earlin_sklearn.models import cifar_resnet

    net = (cifar_resnet(20) if make == "cifar_resnet20" else getattr(torchvision.models, make)(num_classes=10)).eval()
    x = torch.zeros(1, 3, 32, 32)
    candidates = default_candidates(net)
    at, total = flops_at_returns(net, candidates, x)
    assert set(at) == set(candidates) and total > 0
    for layer in candidates[:: max(1, len(candidates) // 8)]:  # a spread of them: each split costs a trace
        assert at[layer] / total == pytest.approx(prefix_flops_share(net, layer, x, total), rel=1e-12)


def test_verbose_search_shows_one_bar_that_ends_full_and_is_quiet_by_default(capsys):
    X, y = make_images(60)
    recommend_layer(make_tiny_cnn(), X, y, layers=["stem", "layer1"], max_edge_flops=1.0)
    assert capsys.readouterr().err == ""
    recommend_layer(make_tiny_cnn(), X, y, layers=["stem", "layer1"], max_edge_flops=1.0, verbose=1)
    updates = [u for u in capsys.readouterr().err.replace("\n", "\r").split("\r") if u.strip()]
    assert updates and all(u.startswith("recommend_layer:") for u in updates)  # no bar per internal fit
    assert "100%" in updates[-1] and "180/180" in updates[-1]  # 60 images, 60 pseudo-OOD, 60 held out
