"""Choosing the cut without OOD data: sweep layers under an edge budget, score with pseudo-OOD."""

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from joblib import Parallel, delayed
from sklearn.model_selection import check_cv
from sklearn.pipeline import Pipeline
from tqdm.auto import tqdm

from ._cost import count_flops, flops_at_returns
from ._detector import ShallowFeatureOODDetector, head_scores
from ._distributed import DaskShards
from ._features import BackboneFeatures, distinct_taps, resolve_extra_layers
from ._inputs import is_torch_data, to_model_input, validate_fit_images
from ._moments import FeatureMoments
from ._passes import fit_power_transform, power_transform
from ._yeo_johnson import coarse_lambdas
from ._scorers import PSEUDO_OOD, pseudo_ood_sets
from ._split import available_split_points, split_model
from ._torch import get_layer, input_dtype
from ._typing import Labels
from .metrics import auroc

if TYPE_CHECKING:
    import torch

PSEUDO_SEED = 0
"""Seed of the pseudo-OOD images (that of :func:`make_pseudo_ood_scorer`'s default), the same for every candidate."""
PSEUDO_PER_IMAGE = "one"
"""Each held-out image gives one pseudo-OOD image, of one kind (``pseudo_ood_sets``): the pass then runs
two images per ID image, where three kinds each would run four."""


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


def default_candidates(backbone: "torch.nn.Module") -> list[str]:
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

    def within(self, max_edge_flops: float) -> "LayerRecommendation":
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


def recommend_layer(backbone: "torch.nn.Module", X: npt.ArrayLike, y: Labels = None, *,
                    layers: "Sequence[str] | None" = None, max_edge_flops: float = 0.5,
                    n_channels: "Sequence[int | float | str]" = ("all",), tolerance: "str | float" = "se",
                    cv: Any = 3, n_jobs: "int | None" = None, **detector_params: Any) -> "LayerRecommendation":
    """Recommend a detection layer (the cut) from ID data only.

    Each candidate layer within the edge budget (and each ``n_channels``) is
    fitted on ID folds and scored on the held-out fold against pseudo-OOD
    images made from it (:func:`make_pseudo_ood_scorer` with
    ``per_image="one"``). It takes one forward pass per image: the
    candidates' prefixes are nested, so one pass to the deepest taps them
    all, and the folds' detectors are fitted on those features. The recommendation is the cheapest candidate whose score
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
    n_channels : sequence, default=("all",)
        Values of ``n_channels`` to try at each layer; the default is the
        detector's own (every pooled feature kept).
    tolerance : "se" or float, default="se"
        When a cheaper candidate ties with the best: ``"se"``, its mean score
        is within one standard error (over the ``cv`` folds) of the best
        candidate's (the one-standard-error rule); a float, within that many
        AUROC units. Pseudo-OOD AUROCs crowd near 1 at good layers, where a
        fixed tolerance such as 0.005 lumps a 0.5% error rate with a 0.02%
        one; the standard error scales with the scores' own noise.
    cv : int, default=3
    n_jobs : int, default=None
        Folds fitted in parallel (joblib).
    **detector_params
        Other :class:`ShallowFeatureOODDetector` parameters (``verbose=1``
        shows one progress bar over the whole search).

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
    if is_torch_data(X) or isinstance(X, DaskShards):
        raise TypeError("recommend_layer needs X as an array or tensor of ID images (the folds need random "
                        f"access); got {type(X).__name__}.")
    template = ShallowFeatureOODDetector(backbone, "", **detector_params)
    template._validate_params()
    X, sample = validate_fit_images(template, X, template.batch_size)
    frozen = copy.deepcopy(backbone).eval()  # counting FLOPs runs it: never the user's model
    example = to_model_input(sample, _device_of(frozen), input_dtype(frozen))
    candidates = list(layers) if layers is not None else default_candidates(frozen)
    for layer in candidates:
        get_layer(frozen, layer)  # a typo is an error, never silently dropped
    if layers is not None:
        for layer in candidates:  # the user's own candidates: checked up front, before any fitting
            try:
                split_model(frozen, layer)
            except ValueError as exc:
                raise ValueError(f"recommend_layer: {layer!r} cannot be a cut point: {exc}") from exc
    at, full_flops = flops_at_returns(frozen, candidates, example)  # every prefix's cost from one pass
    missing = [layer for layer in candidates if layer not in at]
    if layers is not None and missing:
        raise ValueError(f"recommend_layer: {missing[0]!r} is never called in the backbone's forward pass; "
                         "choose layers that forward() uses.")
    costs = {layer: at[layer] / max(full_flops, 1) for layer in candidates if layer in at}
    within = [layer for layer in candidates if layer in costs and costs[layer] <= max_edge_flops]
    if not within:
        raise ValueError(f"No candidate layer runs within {100 * max_edge_flops:.0f}% of the model's FLOPs: "
                         f"{ {k: round(v, 3) for k, v in costs.items()} }.")
    scores = _one_pass_scores(template, frozen, X, sample, y, within, list(n_channels), cv, n_jobs)
    table = [
        {"layer": layer, "n_channels": nc, "edge_flops": costs[layer], "pseudo_auroc": float(np.mean(s)),
         "pseudo_auroc_se": float(np.std(s)) / np.sqrt(len(s))}
        for (layer, nc), s in scores.items()
    ]
    row = pick(table, max_edge_flops, tolerance)
    while layers is None:  # a default candidate is checked to be a cut point once chosen: one trace, not one each
        try:
            split_model(frozen, row["layer"])
            break
        except ValueError:
            table = [r for r in table if r["layer"] != row["layer"]]
            if not table:
                raise
            row = pick(table, max_edge_flops, tolerance)
    over = [{"layer": layer, "edge_flops": costs[layer]} for layer in candidates
            if layer in costs and costs[layer] > max_edge_flops]
    return LayerRecommendation(row["layer"], {"layer": row["layer"], "n_channels": row["n_channels"]}, table,
                               max_edge_flops, tolerance, over)


def _device_of(module):
    """Where ``module``'s weights live (the CPU for a module without any)."""
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else "cpu"


def _one_pass_scores(template, frozen, X, sample, y, within, n_channels, cv, n_jobs):
    """Per-fold pseudo-OOD AUROC of every ``(layer, n_channels)`` candidate, from one forward pass per image.

    The candidates' prefixes are nested, so one pass to the last tap that
    runs yields every candidate's activations (and those of its extra taps):
    each image of ``X`` and each pseudo-OOD image made from a held-out fold
    runs once, never once per candidate. Each fold's detectors are fitted on
    those features with the detector's own steps: the Yeo-Johnson transform
    (fitted once on all the taps' columns: it is fitted per column, so each
    candidate's columns get what a fit on them alone gives), the per-class
    statistics, channel selection and the distance, and score the held-out
    fold against the pseudo-OOD images made from it (:func:`make_pseudo_ood`,
    as :func:`make_pseudo_ood_scorer` does).
    """
    owner = "recommend_layer"
    extras = {layer: resolve_extra_layers(frozen, layer, template.extra_layers) for layer in within}
    names = list(dict.fromkeys(name for layer in within for name in (*extras[layer], layer)))
    runner = BackboneFeatures(
        frozen, within[0], pooling=template.pooling, layout=template.layout, batch_size=template.batch_size,
        device=template.device, n_threads=template.n_threads, precision=template.precision,
    )._fit(sample, owner)
    log = runner._tap_log(sample, names)
    same = distinct_taps(log)
    never = [name for name in names if name not in same]
    if never:
        raise ValueError(f"recommend_layer: {never[0]!r} is never called in the backbone's forward pass; "
                         "choose layers that forward() uses.")
    taps = list(dict.fromkeys(same[name] for name, _, _ in log))  # distinct outputs, in the order they run
    width = {name: int(pooled.shape[1]) for name, _, pooled in log}
    offsets = dict(zip(taps, np.cumsum([0, *[width[t] for t in taps[:-1]]])))

    def columns(layer):
        return tuple(int(c) for name in (*extras[layer], layer)
                     for c in range(offsets[same[name]], offsets[same[name]] + width[same[name]]))

    keys = {layer: columns(layer) for layer in within}
    distinct = list(dict.fromkeys(keys.values()))  # identical features (ResNet's layer1 and layer1.2) fit once
    labels = None if y is None else np.asarray(y)
    if labels is not None and labels.shape != (len(X),):
        raise ValueError(f"y must be 1-D with one label per image; got shape {labels.shape} for {len(X)} images.")
    folds = list(check_cv(cv, labels, classifier=False).split(X, labels))
    # one bar: every image forwarded, then each fold's fits weighted as a pass over its held-out images
    n_steps = len(X) * (2 + (1 if PSEUDO_PER_IMAGE == "one" else len(PSEUDO_OOD)))
    with tqdm(total=n_steps, desc="recommend_layer", disable=template.verbose <= 0) as bar:
        def pooled(images):
            parts = []
            for F, _ in runner._pooled_batches(images, owner, taps):
                parts.append(F)
                bar.update(len(F))
            return np.concatenate(parts)

        F_id = pooled(X)
        pseudo = [[pooled(P) for _, P in pseudo_ood_sets(X[test], PSEUDO_OOD, PSEUDO_SEED, PSEUDO_PER_IMAGE)]
                  for _, test in folds]
        params = {k: v for k, v in template.get_params(deep=False).items() if k not in ("backbone", "layer")}
        # every fold's Yeo-Johnson solve starts from one coarse solve on a sample of all the ID rows
        start = None if template.gaussianize is None else coarse_lambdas(F_id)
        per_fold = Parallel(n_jobs=n_jobs, return_as="generator")(
            delayed(_fold_scores)(params, F_id[train], None if labels is None else labels[train], F_id[test],
                                  pseudo[i], distinct, n_channels, start)
            for i, (train, test) in enumerate(folds))
        results = []
        for fold, (_, test) in zip(per_fold, folds):
            results.append(fold)
            bar.update(len(test))
    return {(layer, nc): [fold[keys[layer], nc] for fold in results] for layer in within for nc in n_channels}


def _fold_scores(params, F_train, y_train, F_test, F_pseudo, distinct, n_channels, start):
    """``{(columns, n_channels): pseudo-OOD AUROC}`` of one fold (module-level: joblib workers pickle it)."""
    owner = "recommend_layer"
    if params["gaussianize"] is None:
        G_train, G_test, G_pseudo = F_train, F_test, F_pseudo
    else:
        gaussianize = fit_power_transform(F_train, solver="newton", start=start)
        G_train = power_transform(gaussianize, F_train, owner)
        G_test = power_transform(gaussianize, F_test)
        G_pseudo = [power_transform(gaussianize, F) for F in F_pseudo]
    out = {}
    for cols in distinct:
        idx = np.asarray(cols)
        moments = FeatureMoments(idx.size, 1).update(G_train[:, idx], y_train)
        for nc in n_channels:
            detector = ShallowFeatureOODDetector(None, "", **{**params, "n_channels": nc})
            # the threshold is no part of a score: not set
            head = Pipeline(list(zip(("select", "distance"), detector._fit_head(moments, threshold=False))))
            s_id = head_scores(head, G_test[:, idx])
            out[cols, nc] = float(np.mean([auroc(s_id, head_scores(head, G[:, idx])) for G in G_pseudo]))
    return out
