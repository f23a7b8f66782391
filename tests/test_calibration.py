"""calibrate_threshold: the threshold set again from held-out ID data, read by every path that decides."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from earlin_sklearn import (DistanceDetector, EarlinWarning, ShallowFeatureOODDetector, TwoStageDetector, load_detector,
                            save_detector)
from earlin_sklearn.baselines import KNNDetector, LogitDetector

from .conftest import make_images, make_tiny_cnn


def test_calibrated_threshold_accepts_target_of_the_calibration_set_and_fit_resets_it():
    rng = np.random.default_rng(0)
    X_train = rng.normal(size=(300, 5))
    det = DistanceDetector(target_tpr=0.9).fit(X_train)
    fitted_offset = det.offset_
    X_cal = rng.normal(loc=0.6, size=(500, 5))  # the deployment's ID data moved: the training threshold is off
    before = np.mean(det.predict(X_cal) == 1)
    assert det.calibrate_threshold(X_cal) is det
    assert np.mean(det.predict(X_cal) == 1) == pytest.approx(0.9)
    assert det.offset_ != fitted_offset and abs(before - 0.9) > 0.03
    assert det.fit(X_train).offset_ == fitted_offset  # a later fit sets it from the training data again
    np.testing.assert_allclose(det.decision_function(X_cal), det.score_samples(X_cal) - det.offset_)


def test_logit_threshold_from_the_training_images_is_off_and_calibration_fixes_it():
    # scores on images the fit saw at a larger contrast are higher than on new ID images: the situation of a
    # backbone scored on its own training images; the calibrated threshold holds on a fresh draw
    model = make_tiny_cnn()
    X_train, _ = make_images(400, seed=1)
    X_cal, _ = make_images(600, seed=2)
    X_new, _ = make_images(1000, seed=3)
    det = LogitDetector(model, "energy", target_tpr=0.9, device="cpu").fit(2.0 * X_train)
    off = np.mean(det.predict(X_new) == 1)
    det.calibrate_threshold(X_cal)
    held = np.mean(det.predict(X_new) == 1)
    assert abs(held - 0.9) < 0.04, held
    assert abs(off - 0.9) > 0.05, off


def test_the_composite_exports_and_saves_the_calibrated_threshold(tmp_path):
    X, y = make_images(200)
    det = ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu", target_tpr=0.9).fit(X, y)
    X_cal, _ = make_images(300, seed=4)
    old = det.offset_
    det.calibrate_threshold(torch.utils.data.DataLoader(torch.from_numpy(X_cal), batch_size=64))
    assert det.offset_ != old and det.pipeline_["distance"].offset_ == det.offset_
    assert np.mean(det.predict(X_cal) == 1) == pytest.approx(0.9)
    edge, _ = det.export_split()
    assert float(edge.head.offset) == det.offset_
    with torch.no_grad():
        out = edge(torch.from_numpy(X_cal[:50]))
    np.testing.assert_array_equal(out.is_id.numpy(), det.predict(X_cal[:50]) == 1)
    save_detector(det, tmp_path / "det")
    assert load_detector(tmp_path / "det", make_tiny_cnn()).offset_ == det.offset_


def test_two_stage_calibration_gives_the_edge_its_share_and_the_cloud_the_rest():
    X, y = make_images(200)
    two = TwoStageDetector(ShallowFeatureOODDetector(make_tiny_cnn(), "layer1", device="cpu"),
                           target_tpr=0.9).fit(X, y)
    X_cal, _ = make_images(400, seed=6)
    two.calibrate_threshold(X_cal)
    edge_ok = two.edge_.predict(X_cal) == 1
    assert np.sum(~edge_ok) == int(np.floor(400 * (1 - 0.9 ** 0.5)))  # 20: the edge's share of the budget
    assert np.sum(two.predict(X_cal) == -1) == 40  # together exactly 10% of the calibration images, overlap once
    assert np.sum(two.cloud_.predict(X_cal[edge_ok]) == -1) == 20
    assert two.offset_ == 0.0
    _, head = two.export_split()
    assert float(head.offset) == two.cloud_.offset_
    X_new, _ = make_images(400, seed=7)
    assert abs(np.mean(two.predict(X_new) == 1) - 0.9) < 0.05
    with pytest.warns(EarlinWarning) as record:  # 30 images: one warning, not one per stage
        two.calibrate_threshold(X_cal[:30])
    assert len(record) == 1
    deep_only = TwoStageDetector(two.edge, target_tpr=0.9, edge_share=0.0).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deep_only.calibrate_threshold(X_cal)
    assert np.all(deep_only.edge_.predict(X_cal) == 1)  # an edge at 100% rejects nothing
    assert np.sum(deep_only.cloud_.predict(X_cal) == -1) == 40


def test_calibration_errors_are_clear():
    rng = np.random.default_rng(1)
    with pytest.raises(NotFittedError):
        DistanceDetector().calibrate_threshold(rng.normal(size=(100, 3)))
    det = KNNDetector(k=5).fit(rng.normal(size=(100, 3)))
    bad = rng.normal(size=(100, 3))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN|non-finite"):
        det.calibrate_threshold(bad)
    with pytest.warns(EarlinWarning, match="at least 100 samples"):
        det.calibrate_threshold(rng.normal(size=(40, 3)))
    with pytest.raises(ValueError):
        det.calibrate_threshold(np.empty((0, 3)))
