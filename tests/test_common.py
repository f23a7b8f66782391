"""scikit-learn's estimator contract for every public estimator."""

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from earlin_sklearn import (BackboneFeatures, ChannelSelector, DistanceDetector, ShallowFeatureOODDetector,
                            TwoStageDetector)
from earlin_sklearn.baselines import EnergyKNNDetector, KNNDetector, LogitDetector

from .conftest import AnyInputClassifier, AnyInputLinearClassifier, AnyInputNet

ESTIMATORS = [
    BackboneFeatures(AnyInputNet(), layer="act", device="cpu"),
    ChannelSelector(),
    ChannelSelector(n_channels=0.5, criterion="variance"),
    DistanceDetector(),
    DistanceDetector(metric="cosine"),
    DistanceDetector(metric="euclidean", class_conditional=False),
    ShallowFeatureOODDetector(AnyInputNet(), layer="act", device="cpu"),
    # A float64 backbone: the whole pipeline is then batch-size invariant to 1e-7.
    ShallowFeatureOODDetector(AnyInputNet().double(), layer="act", metric="euclidean", device="cpu"),
    LogitDetector(AnyInputClassifier().double(), device="cpu"),
    LogitDetector(AnyInputClassifier().double(), method="odin", temperature=10.0, device="cpu"),
    LogitDetector(AnyInputClassifier().double(), method="energy", device="cpu"),
    KNNDetector(k=3),
    EnergyKNNDetector(AnyInputLinearClassifier().double(), k=3, device="cpu"),
    TwoStageDetector(ShallowFeatureOODDetector(AnyInputClassifier().double(), layer="act", device="cpu")),
]


TORCH_PARAM_HASH = (
    "joblib.hash of a torch module includes its storages' memory addresses, so the "
    "deep copy that this check compares against never hashes equal; "
    "tests/test_detector.py::test_fit_leaves_backbone_untouched checks the property "
    "directly (weights, training flag, requires_grad, hooks)."
)


FLOAT32_BATCHES = (
    "a float32 backbone rounds differently for different batch sizes (PyTorch picks "
    "other kernels), which moves scores by ~1e-7 relative, above this check's float64 "
    "tolerance; the float64-backbone instance passes it."
)


def expected_failed_checks(estimator):
    failed = {}
    if isinstance(estimator, (BackboneFeatures, ShallowFeatureOODDetector, LogitDetector, EnergyKNNDetector,
                               TwoStageDetector)):
        failed["check_estimators_overwrite_params"] = TORCH_PARAM_HASH
    if isinstance(estimator, ShallowFeatureOODDetector) and next(estimator.backbone.parameters()).dtype.itemsize == 4:
        failed["check_methods_subset_invariance"] = FLOAT32_BATCHES
    return failed


# scikit-learn's checks fit on a few samples, and on integer arrays, on purpose; the warnings that so few cannot
# set a threshold and that integer pixels need scaling are tested in tests/test_bad_inputs.py and the bad-input table
@pytest.mark.filterwarnings("ignore:.*the threshold cannot reject a single one of them:earlin_sklearn.exceptions.EarlinWarning")
@pytest.mark.filterwarnings("ignore:.*their integer pixels are fed to the model:earlin_sklearn.exceptions.EarlinWarning")
@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
