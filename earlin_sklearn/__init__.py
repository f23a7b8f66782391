"""earlin_sklearn: early out-of-distribution detection from a shallow layer of a frozen CNN.

EARLIN (Nimi et al., 2021) as scikit-learn estimators over PyTorch models:
images -> :class:`BackboneFeatures` (pooled channels of one layer) ->
:class:`ChannelSelector` -> :class:`DistanceDetector` -> ID/OOD decision, composed
by :class:`ShallowFeatureOODDetector`.
"""

from . import metrics
from ._detector import ShallowFeatureOODDetector
from ._distance import DistanceDetector
from ._features import BackboneFeatures
from ._scorers import make_ood_scorer, make_pseudo_ood, make_pseudo_ood_scorer
from ._selection import ChannelSelector

__version__ = "0.1.0"

__all__ = [
    "BackboneFeatures",
    "ChannelSelector",
    "DistanceDetector",
    "ShallowFeatureOODDetector",
    "make_ood_scorer",
    "make_pseudo_ood",
    "make_pseudo_ood_scorer",
    "metrics",
]
