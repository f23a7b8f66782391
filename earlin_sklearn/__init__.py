"""earlin_sklearn: early out-of-distribution detection from a shallow layer of a frozen CNN.

EARLIN (Nimi et al., 2021) as scikit-learn estimators over PyTorch models:
images -> :class:`BackboneFeatures` (pooled channels of one layer) ->
:class:`ChannelSelector` -> :class:`DistanceDetector` -> ID/OOD decision, composed
by :class:`ShallowFeatureOODDetector`; its :meth:`~ShallowFeatureOODDetector.export_split`
cuts the model into the edge part (prefix + detector) and the cloud part (the rest).
"""

from . import exceptions, metrics
from ._cost import CostComparison, SplitCost, collaborative_cost, split_cost
from ._detector import ShallowFeatureOODDetector
from ._distance import DistanceDetector
from ._edge import CloudModule, DetectorHead, EdgeModule, EdgeOutput
from ._edge_runner import EdgeRecord, EdgeRunner
from ._export import load_split, save_split
from ._features import BackboneFeatures
from ._layer_choice import LayerRecommendation, recommend_layer
from ._persist import load_detector, save_detector
from ._scorers import make_ood_scorer, make_pseudo_ood, make_pseudo_ood_scorer
from ._selection import ChannelSelector
from ._server import create_cloud_app
from ._split import available_split_points, split_model
from .exceptions import EarlinWarning, SplitVerificationError

__version__ = "0.1.0"

__all__ = [
    "BackboneFeatures",
    "ChannelSelector",
    "CloudModule",
    "CostComparison",
    "DetectorHead",
    "DistanceDetector",
    "EdgeModule",
    "EdgeOutput",
    "EdgeRecord",
    "EdgeRunner",
    "LayerRecommendation",
    "ShallowFeatureOODDetector",
    "SplitCost",
    "available_split_points",
    "collaborative_cost",
    "create_cloud_app",
    "make_ood_scorer",
    "make_pseudo_ood",
    "make_pseudo_ood_scorer",
    "metrics",
    "recommend_layer",
    "save_split",
    "load_split",
    "save_detector",
    "load_detector",
    "SplitVerificationError",
    "EarlinWarning",
    "split_cost",
    "split_model",
]
