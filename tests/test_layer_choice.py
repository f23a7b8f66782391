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
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_ties_go_to_the_cheaper_layer_and_budgets_narrow_the_table():
    X, y = make_images(60)
    rec = recommend_layer(make_tiny_cnn(), X, y, layers=["stem", "layer1"], max_edge_flops=1.0, tolerance=1.0)
    assert rec.layer == "stem"
    strict = recommend_layer(make_tiny_cnn(), X, y, layers=["stem", "layer1"], max_edge_flops=1.0, tolerance=0.0)
    best = max(r["pseudo_auroc"] for r in strict.table)
    assert next(r for r in strict.table if r["layer"] == strict.layer)["pseudo_auroc"] == best
    narrow = strict.within(0.5)
    assert narrow.layer == "stem" and {r["layer"] for r in narrow.table} == {"stem"}


def test_nothing_within_budget_is_a_clear_error():
    X, _ = make_images(30)
    with pytest.raises(ValueError, match="No candidate layer runs within 1%"):
        recommend_layer(make_tiny_cnn(), X, layers=["layer1"], max_edge_flops=0.01)
