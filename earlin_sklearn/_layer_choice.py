"""Choosing the cut without OOD data: sweep layers under an edge budget, score with pseudo-OOD."""

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import GridSearchCV

from ._cost import count_flops
from ._detector import ShallowFeatureOODDetector
from ._torch import get_layer, input_dtype
from ._scorers import make_pseudo_ood_scorer
from ._split import available_split_points, split_model


def prefix_flops_share(backbone, layer, example, full_flops=None):
    """Share of ``backbone``'s FLOPs (on ``example``) spent up to and including ``layer``.

    The backbone prefix only; :attr:`SplitCost.edge_flops_fraction` adds the
    detector head of a fitted split.

    Pass ``full_flops`` (``count_flops(backbone, example)``) when asking for
    several layers, so that the whole model is counted once.
    """
    prefix, _ = split_model(backbone, layer)
    if full_flops is None:
        full_flops = count_flops(backbone, example)
    return count_flops(prefix, example) / max(full_flops, 1)


def default_candidates(backbone):
    """Called layers at most two levels deep (``"layer1"``, ``"features.3"``), in execution order."""
    return [n for n in available_split_points(backbone) if n.count(".") <= 1]


def pick(table, max_edge_flops=1.0, tolerance="se"):
    """The cheapest row of ``table`` within the budget whose score ties with the best.

    ``tolerance="se"``: the one-standard-error rule (Hastie, Tibshirani &
    Friedman, *Elements of Statistical Learning*, 7.10): a row ties when its
    mean score is within one standard error (over the CV folds) of the best
    row's. A float: within that many AUROC units of the best.
    """
    within = [r for r in table if r["edge_flops"] <= max_edge_flops]
    if not within:
        raise ValueError(f"No candidate layer runs within {100 * max_edge_flops:.0f}% of the model's FLOPs.")
    top = max(within, key=lambda r: (r["pseudo_auroc"], -r["edge_flops"]))
    margin = top.get("pseudo_auroc_se", 0.0) if tolerance == "se" else float(tolerance)
    return min((r for r in within if r["pseudo_auroc"] >= top["pseudo_auroc"] - margin),
               key=lambda r: (r["edge_flops"], -r["pseudo_auroc"]))


@dataclass
class LayerRecommendation:
    """Result of :func:`recommend_layer`; print it for a table."""

    layer: str
    params: dict
    table: list = field(default_factory=list)
    budget: float = 1.0
    tolerance: object = "se"
    over_budget: list = field(default_factory=list)
    """Candidates not fitted because their prefix exceeds the budget: ``{"layer", "edge_flops"}`` rows."""

    def within(self, max_edge_flops):
        """The recommendation under a smaller edge budget, from the same table (no refitting)."""
        row = pick(self.table, max_edge_flops, self.tolerance)
        dropped = {r["layer"]: r["edge_flops"] for r in self.table if r["edge_flops"] > max_edge_flops}
        over = [{"layer": k, "edge_flops": v} for k, v in dropped.items()] + list(self.over_budget)
        return LayerRecommendation(row["layer"], {"layer": row["layer"], "n_channels": row["n_channels"]},
                                   [r for r in self.table if r["edge_flops"] <= max_edge_flops], max_edge_flops,
                                   self.tolerance, over)

    def __str__(self):
        lines = [f"{'layer':<24}{'edge FLOPs':>11}{'n_channels':>12}{'pseudo-OOD AUROC':>18}"]
        for row in self.table:
            mark = "  <- recommended" if (row["layer"], row["n_channels"]) == (self.layer, self.params["n_channels"]) else ""
            lines.append(f"{row['layer']:<24}{100 * row['edge_flops']:>10.1f}%{str(row['n_channels']):>12}"
                         f"{100 * row['pseudo_auroc']:>17.2f}%{mark}")
        if self.over_budget:
            lines.append("over the edge budget, not fitted: " + ", ".join(
                f"{r['layer']} ({100 * r['edge_flops']:.1f}%)" for r in self.over_budget))
        lines.append(f"(edge budget {100 * self.budget:.0f}% of the model's FLOPs; ties: "
                     f"{'one standard error' if self.tolerance == 'se' else self.tolerance}; scored on held-out ID folds "
                     "against pseudo-OOD made from them: no OOD data used)")
        return "\n".join(lines)


def recommend_layer(backbone, X, y=None, *, layers=None, max_edge_flops=0.5, n_channels=("auto",),
                    tolerance="se", cv=3, n_jobs=None, **detector_params):
    """Recommend a detection layer (the cut) from ID data only.

    Each candidate layer within the edge budget (and each ``n_channels``) is
    fitted on ID folds and scored by :func:`make_pseudo_ood_scorer` on the
    held-out fold. The recommendation is the cheapest candidate whose score
    ties with the best one (``tolerance``).

    Parameters
    ----------
    backbone : torch.nn.Module
    X : array-like or tensor of shape (N, C, H, W)
        ID images.
    y : array-like of shape (N,), default=None
        ID class labels.
    layers : list of str, default=None
        Candidates; default: the called layers at most two levels deep.
    max_edge_flops : float, default=0.5
        Largest share of the model's FLOPs that the edge may run.
    n_channels : sequence, default=("auto",)
        Values of ``n_channels`` to try at each layer.
    tolerance : "se" or float, default="se"
        When a cheaper candidate ties with the best: ``"se"``, its mean score
        is within one standard error (over the ``cv`` folds) of the best
        candidate's (the one-standard-error rule); a float, within that many
        AUROC units. Pseudo-OOD AUROCs crowd near 1 at good layers, where a
        fixed tolerance such as 0.005 lumps a 0.5% error rate with a 0.02%
        one; the standard error scales with the scores' own noise.
    cv : int, default=3
    n_jobs : int, default=None
        Passed to ``GridSearchCV``.
    **detector_params
        Other :class:`ShallowFeatureOODDetector` parameters.

    Returns
    -------
    recommendation : LayerRecommendation
        ``.layer``, ``.params`` (the winning ``layer`` and ``n_channels``) and
        ``.table`` (every candidate with its edge FLOPs share and score);
        ``.over_budget`` lists the candidates left out by ``max_edge_flops``
        with their FLOPs share (printed under the table).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from earlin_sklearn import recommend_layer
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(60, 3, 32, 32).numpy()
    >>> rec = recommend_layer(cifar_resnet(20), X, np.arange(60) % 2, layers=["layer1.0", "layer1"],
    ...                       max_edge_flops=0.5, cv=2)
    >>> rec.layer in ("layer1.0", "layer1"), sorted(r["layer"] for r in rec.table)
    (True, ['layer1', 'layer1.0'])
    """
    if not (tolerance == "se" or (isinstance(tolerance, (int, float)) and tolerance >= 0)):
        raise ValueError(f"tolerance must be 'se' or a number >= 0; got {tolerance!r}.")
    if not isinstance(X, torch.Tensor):
        X = np.asarray(X)
    frozen = copy.deepcopy(backbone).eval()  # counting FLOPs runs it: never the user's model
    example = torch.as_tensor(np.asarray(X[:1]), dtype=input_dtype(frozen))
    candidates = list(layers) if layers is not None else default_candidates(frozen)
    for layer in candidates:
        get_layer(frozen, layer)  # a typo is an error, never silently dropped
    full_flops = count_flops(frozen, example)
    costs = {}
    for layer in candidates:
        try:
            costs[layer] = prefix_flops_share(frozen, layer, example, full_flops)
        except ValueError as exc:
            if layers is not None:
                raise ValueError(f"recommend_layer: {layer!r} cannot be a cut point: {exc}") from exc
            continue  # a default candidate that is not a valid cut point
    within = [layer for layer in candidates if layer in costs and costs[layer] <= max_edge_flops]
    if not within:
        raise ValueError(f"No candidate layer runs within {100 * max_edge_flops:.0f}% of the model's FLOPs: "
                         f"{ {k: round(v, 3) for k, v in costs.items()} }.")
    search = GridSearchCV(
        ShallowFeatureOODDetector(backbone, within[0], **detector_params),
        {"layer": within, "n_channels": list(n_channels)},
        scoring=make_pseudo_ood_scorer(),
        cv=cv,
        n_jobs=n_jobs,
        refit=False,
    ).fit(X, y)
    table = [
        {"layer": p["layer"], "n_channels": p["n_channels"], "edge_flops": costs[p["layer"]], "pseudo_auroc": float(s),
         "pseudo_auroc_se": float(sd) / np.sqrt(search.n_splits_)}
        for p, s, sd in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"],
                            search.cv_results_["std_test_score"])
    ]
    row = pick(table, max_edge_flops, tolerance)
    over = [{"layer": layer, "edge_flops": costs[layer]} for layer in candidates
            if layer in costs and costs[layer] > max_edge_flops]
    return LayerRecommendation(row["layer"], {"layer": row["layer"], "n_channels": row["n_channels"]}, table,
                               max_edge_flops, tolerance, over)
