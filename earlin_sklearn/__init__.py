"""earlin_sklearn: early out-of-distribution detection from a shallow layer of a frozen CNN.

EARLIN (Nimi et al., 2021) as scikit-learn estimators over PyTorch models:
images -> :class:`BackboneFeatures` (pooled channels of one layer) ->
:class:`ChannelSelector` -> :class:`DistanceDetector` -> ID/OOD decision, composed
by :class:`ShallowFeatureOODDetector`; its :meth:`~ShallowFeatureOODDetector.export_split`
cuts the model into the edge part (prefix + detector) and the cloud part (the rest).
"""

import importlib
from typing import TYPE_CHECKING

# Public names and the module that defines each. They are imported on first use (PEP 562), so that
# `earlin --help` and `import earlin_sklearn` do not pay for importing torch until it is needed.
_EXPORTS = {
    "BackboneFeatures": "._features",
    "ChannelSelector": "._selection",
    "CloudModule": "._edge",
    "CostComparison": "._cost",
    "DaskShards": "._distributed",
    "DetectorHead": "._edge",
    "DistanceDetector": "._distance",
    "EarlinDeprecationWarning": ".exceptions",
    "EarlinWarning": ".exceptions",
    "EdgeModule": "._edge",
    "EdgeOutput": "._edge",
    "EdgeProgram": ".edge",
    "EdgeRecord": ".edge",
    "EdgeRunner": ".edge",
    "LayerRecommendation": "._layer_choice",
    "ShallowFeatureOODDetector": "._detector",
    "TwoStageDetector": "._two_stage",
    "CloudHead": "._two_stage",
    "Split": "._edge",
    "SplitCost": "._cost",
    "SplitVerificationError": ".exceptions",
    "DetectorFileError": ".exceptions",
    "available_split_points": "._split",
    "collaborative_cost": "._cost",
    "create_cloud_app": "._server",
    "load_detector": "._persist",
    "load_edge_program": ".edge",
    "load_split": "._export",
    "held_out_class_auroc": "._scorers",
    "make_ood_scorer": "._scorers",
    "make_pseudo_ood": "._scorers",
    "make_pseudo_ood_scorer": "._scorers",
    "recommend_layer": "._layer_choice",
    "save_detector": "._persist",
    "save_split": "._export",
    "split_cost": "._cost",
    "split_model": "._split",
}
_SUBMODULES = ("baselines", "datasets", "edge", "exceptions", "metrics", "models")

if TYPE_CHECKING:  # what a type checker sees: the same names, imported eagerly
    from . import baselines, datasets, edge, exceptions, metrics, models  # noqa: F401
    from ._cost import CostComparison, SplitCost, collaborative_cost, split_cost  # noqa: F401
    from ._detector import ShallowFeatureOODDetector  # noqa: F401
    from ._distance import DistanceDetector  # noqa: F401
    from ._distributed import DaskShards  # noqa: F401
    from ._edge import CloudModule, DetectorHead, EdgeModule, EdgeOutput, Split  # noqa: F401
    from ._export import load_split, save_split  # noqa: F401
    from ._features import BackboneFeatures  # noqa: F401
    from ._layer_choice import LayerRecommendation, recommend_layer  # noqa: F401
    from ._persist import load_detector, save_detector  # noqa: F401
    from ._scorers import held_out_class_auroc, make_ood_scorer, make_pseudo_ood, make_pseudo_ood_scorer  # noqa: F401
    from ._selection import ChannelSelector  # noqa: F401
    from ._server import create_cloud_app  # noqa: F401
    from ._split import available_split_points, split_model  # noqa: F401
    from ._two_stage import CloudHead, TwoStageDetector  # noqa: F401
    from .edge import EdgeProgram, EdgeRecord, EdgeRunner, load_edge_program  # noqa: F401
    from .exceptions import (  # noqa: F401
        DetectorFileError,
        EarlinDeprecationWarning,
        EarlinWarning,
        SplitVerificationError,
    )


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'earlin_sklearn' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])


__version__ = "0.2.0.dev0"

__all__ = sorted([*_EXPORTS, "metrics"])
