"""The bad-input table: odd input as users send it, and what each gets.

Each row is one kind of input sent to one entry point, with the answer a
user should get: a clear error naming the class they called and the problem
(``raises``), a documented conversion or warning with a sound result
(``warns`` / ``works``). No row may end in a silent wrong answer: every
``works`` row checks the result, not only that nothing raised.
"""

import copy
import pickle
from functools import lru_cache

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError
from torch.utils.data import DataLoader, TensorDataset

from earlin_sklearn import (BackboneFeatures, ChannelSelector, DistanceDetector, EarlinWarning,
                            ShallowFeatureOODDetector, load_split)
from earlin_sklearn.baselines import KNNDetector, LogitDetector

from .conftest import make_images, make_tiny_cnn

OWNER = "ShallowFeatureOODDetector"


@lru_cache(maxsize=None)
def _data():
    return make_images(60)


@lru_cache(maxsize=None)
def _net():
    return make_tiny_cnn()


def _det(**params):
    return ShallowFeatureOODDetector(_net(), params.pop("layer", "layer1"), device="cpu", **params)


@lru_cache(maxsize=None)
def _fitted():
    X, y = _data()
    return _det().fit(X, y)


def _loader(*tensors, batch_size=8):
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


def _X():
    return _data()[0]


def _y():
    return _data()[1]


def _is_detector(est):
    X = _X()
    far = np.full_like(X[:4], 40.0)
    return (est.predict(X).mean() > 0.5) and (est.predict(far) == -1).all()  # sound: ID mostly in, far out


def _decisions(pred, n):
    return pred.shape == (n,) and set(np.unique(pred)) <= {-1, 1}


def raises(exc, match):
    return ("raises", exc, match)


def warns(match, check):
    return ("warns", match, check)


def works(check):
    return ("works", None, check)


def _predict_with_inplace_backbone():
    """A backbone whose first op is in place (x.mul_): the caller's float32 array must come back unchanged."""
    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_tiny_cnn()

        def forward(self, x):
            x.mul_(2.0)
            return self.net(x)

    X = _X().copy()
    before = X.copy()
    det = ShallowFeatureOODDetector(InPlace(), "net.layer1", device="cpu").fit(X)
    det.predict(X)
    det.score_samples(torch.from_numpy(X))
    det.fit(_loader(torch.from_numpy(X)))
    return np.array_equal(X, before)


ROWS = {
    # --- fit: what X is --------------------------------------------------------------------------------
    "fit: None": (lambda: _det().fit(None), raises(ValueError, f"{OWNER}.fit takes ID images")),
    "fit: a scalar": (lambda: _det().fit(3.0), raises(ValueError, f"{OWNER}.fit takes ID images")),
    "fit: strings": (lambda: _det().fit(np.array([["a"]])), raises(ValueError, "numeric")),
    "fit: complex images": (lambda: _det().fit(_X().astype(np.complex64)), raises(ValueError, "Complex data")),
    "fit: no images": (lambda: _det().fit(_X()[:0]), raises(ValueError, "0 sample")),
    "fit: one image": (lambda: _det().fit(_X()[:1]), raises(ValueError, f"{OWNER} needs at least 2")),
    "fit: nested lists": (lambda: _det().fit(_X().tolist()), works(_is_detector)),
    "fit: float16 images": (lambda: _det().fit(_X().astype(np.float16)), works(_is_detector)),
    "fit: float64 images": (lambda: _det().fit(_X().astype(np.float64)), works(_is_detector)),
    "fit: a torch tensor": (lambda: _det().fit(torch.from_numpy(_X())), works(_is_detector)),
    "fit: a tensor that requires grad": (lambda: _det().fit(torch.from_numpy(_X()).requires_grad_()),
                                         works(_is_detector)),
    "fit: a Fortran-ordered array": (lambda: _det().fit(np.asfortranarray(_X())), works(_is_detector)),
    "fit: a read-only array": (lambda: _det().fit(np.lib.stride_tricks.as_strided(_X(), writeable=False)),
                               works(_is_detector)),
    "fit: uint8 images": (lambda: _det().fit((_X() * 255).astype(np.uint8)), warns("uint8", lambda e: True)),
    "fit: int32 pixel images": (lambda: _det().fit((_X() * 255).astype(np.int32)), warns("int32 images", lambda e: True)),
    "fit: int64 loader batches": (lambda: _det().fit(_loader(torch.from_numpy((_X() * 255).astype(np.int64)))),
                                  warns("int64 images", lambda e: True)),
    "fit: a generator of images": (lambda: _det().fit(x for x in _X()), raises(ValueError, f"{OWNER} got a generator")),
    "fit: a bfloat16 tensor": (lambda: _det().fit(torch.from_numpy(_X()).bfloat16()), works(_is_detector)),
    "LogitDetector: a model whose output is not logits": (lambda: LogitDetector(torch.nn.Conv2d(3, 4, 3), device="cpu")
                                                          .fit(_X()), raises(ValueError, "returns a tensor of shape")),
    "fit: NaN in images": (lambda: _det().fit(np.where(_X() > 0.9, np.nan, _X())), raises(ValueError, "NaN")),
    "fit: inf in images": (lambda: _det().fit(np.where(_X() > 0.9, np.inf, _X())), raises(ValueError, "infinity")),
    "fit: finite images whose activations overflow": (lambda: _det().fit(_X() * 1e30),
                                                      raises(ValueError, f"{OWNER}: the backbone's activations overflowed")),
    "fit: constant images": (lambda: _det().fit(np.zeros_like(_X())), raises(ValueError, f"{OWNER}: the ID features do not vary")),
    "fit: 2-D array": (lambda: _det().fit(_X()[:, 0, 0, :]), raises(ValueError, f"{OWNER}: the backbone could not run")),
    "fit: 3-D array": (lambda: _det().fit(_X()[:, 0]), raises(ValueError, f"{OWNER}: the backbone could not run")),
    "fit: 5-D array": (lambda: _det().fit(_X()[:, None]), raises(ValueError, f"{OWNER}: the backbone could not run")),
    "fit: channels-last images": (lambda: _det().fit(_X().transpose(0, 2, 3, 1)), raises(ValueError, "channels-last")),
    # --- fit: what y is --------------------------------------------------------------------------------
    "fit: y of another length": (lambda: _det().fit(_X(), _y()[:5]), raises(ValueError, f"{OWNER}: X has 60 samples but y has 5")),
    "fit: one-hot y": (lambda: _det().fit(_X(), np.eye(3)[_y()]), raises(ValueError, "one class label per image")),
    "fit: y as a column": (lambda: _det().fit(_X(), _y()[:, None]), works(_is_detector)),
    "fit: continuous y": (lambda: _det().fit(_X(), np.linspace(0, 1, 60)), raises(ValueError, "continuous")),
    "fit: y with NaN": (lambda: _det().fit(_X(), np.where(_y() == 0, np.nan, _y())), raises(ValueError, "NaN")),
    "fit: y of None objects": (lambda: _det().fit(_X(), [None] * 60), raises(ValueError, "label type")),
    "fit: string y": (lambda: _det().fit(_X(), np.array(["cat", "dog", "eel"])[_y()]),
                      works(lambda e: _is_detector(e) and e.pipeline_["distance"].classes_.tolist() == ["cat", "dog", "eel"])),
    "fit: one class": (lambda: _det().fit(_X(), np.zeros(60)), works(_is_detector)),
    "fit: sample ids as y": (lambda: _det().fit(_X(), np.arange(60)), warns("single sample", _is_detector)),
    "fit: sample ids as y, class_conditional=True": (lambda: _det(class_conditional=True).fit(_X(), np.arange(60)),
                                                     raises(ValueError, f"{OWNER}: .*single sample")),
    "fit: class_conditional=True without y": (lambda: _det(class_conditional=True).fit(_X()),
                                              raises(ValueError, "needs class labels")),
    # --- fit: loaders ----------------------------------------------------------------------------------
    "fit: a DataLoader of (x, y)": (lambda: _det().fit(_loader(torch.from_numpy(_X()), torch.from_numpy(_y()))),
                                    works(_is_detector)),
    "fit: a DataLoader of (x,)": (lambda: _det().fit(_loader(torch.from_numpy(_X()))), works(_is_detector)),
    "fit: a DataLoader of (x, y, extra)": (lambda: _det().fit(_loader(torch.from_numpy(_X()), torch.from_numpy(_y()),
                                                                      torch.zeros(60))), works(_is_detector)),
    "fit: a Dataset": (lambda: _det().fit(TensorDataset(torch.from_numpy(_X()), torch.from_numpy(_y()))),
                       works(_is_detector)),
    "fit: a DataLoader of dicts": (lambda: _det().fit(DataLoader([{"x": torch.zeros(3, 12, 12)}] * 4, batch_size=2)),
                                   raises(TypeError, "got a batch of type dict")),
    "fit: an empty DataLoader": (lambda: _det().fit(_loader(torch.zeros(0, 3, 12, 12))),
                                 raises(ValueError, f"{OWNER} got an empty")),
    "fit: images of two sizes in a loader": (lambda: _det().fit(DataLoader([torch.zeros(3, 12, 12), torch.zeros(3, 14, 14)],
                                                                           batch_size=1)),
                                             raises(ValueError, r"batch 1 has images of shape \(3, 14, 14\)")),
    "fit: continuous labels from a loader": (lambda: _det().fit(_loader(torch.from_numpy(_X()), torch.rand(60))),
                                             raises(ValueError, "continuous")),
    "fit: NaN in a loader batch": (lambda: _det().fit(_loader(torch.full((4, 3, 12, 12), float("nan")))),
                                   raises(ValueError, f"{OWNER} got images containing NaN")),
    "fit: uint8 loader batches": (lambda: _det().fit(_loader(torch.from_numpy((_X() * 255).astype(np.uint8)))),
                                  warns("uint8", lambda e: True)),
    "fit: y overriding a loader's labels, too short": (lambda: _det().fit(_loader(torch.from_numpy(_X())), _y()[:10]),
                                                       raises(ValueError, "more samples than the 10 labels")),
    "fit: DaskShards with a separate y": (lambda: _det().fit(_dask_shards(), _y()), raises(ValueError, "y must be None")),
    # --- fit: parameters -------------------------------------------------------------------------------
    "fit: a layer that does not exist": (lambda: _det(layer="nope").fit(_X()), raises(ValueError, "'nope' is not a submodule")),
    "fit: a backbone that is a function": (lambda: ShallowFeatureOODDetector(lambda x: x, "layer1").fit(_X()),
                                           raises(InvalidParameterError, "'backbone' parameter")),
    "fit: target_tpr=0": (lambda: _det(target_tpr=0).fit(_X()), raises(InvalidParameterError, "target_tpr")),
    "fit: target_tpr=1.5": (lambda: _det(target_tpr=1.5).fit(_X()), raises(InvalidParameterError, "target_tpr")),
    "fit: target_tpr=1": (lambda: _det(target_tpr=1.0).fit(_X()),
                          works(lambda e: (e.predict(_X()) == 1).all())),
    "fit: target_tpr=1e-12": (lambda: _det(target_tpr=1e-12, threshold_cv=None).fit(_X()),
                              works(lambda e: (e.predict(_X()) == -1).all())),
    "fit: batch_size=0": (lambda: _det(batch_size=0).fit(_X()), raises(InvalidParameterError, "batch_size")),
    "fit: n_channels=0": (lambda: _det(n_channels=0).fit(_X()), raises(InvalidParameterError, "n_channels")),
    "fit: n_channels above the feature count": (lambda: _det(n_channels=1000).fit(_X()),
                                                warns("all are kept", _is_detector)),
    "fit: threshold_cv=1": (lambda: _det(threshold_cv=1).fit(_X()), raises(InvalidParameterError, "threshold_cv")),
    "fit: a pooling typo": (lambda: _det(pooling="avg").fit(_X()), raises(InvalidParameterError, "pooling")),
    "fit: extra_layers as one string": (lambda: _det(extra_layers="stem").fit(_X()),
                                        raises(InvalidParameterError, "extra_layers")),
    "fit: extra_layers holding the layer": (lambda: _det(extra_layers=["layer1"]).fit(_X()),
                                            raises(ValueError, "must not contain `layer`")),
    "fit: an extra layer that runs after the layer": (lambda: _det(layer="stem", extra_layers=["layer1"]).fit(_X()),
                                                      raises(ValueError, "must run before `layer`")),
    "fit: device='cuda' without a GPU": (lambda: _det_on("cuda").fit(_X()) if not torch.cuda.is_available() else
                                         pytest.skip("a GPU is present"), raises(ValueError, "finds no CUDA device")),
    "fit: a device that does not exist": (lambda: _det_on("tpu").fit(_X()), raises(ValueError, "not a torch device")),
    # --- predict and scores ----------------------------------------------------------------------------
    "predict before fit": (lambda: _det().predict(_X()), raises(Exception, "not fitted yet")),
    "predict: no images": (lambda: _fitted().predict(_X()[:0]), raises(ValueError, "0 sample")),
    "predict: float64 images": (lambda: _fitted().predict(_X().astype(np.float64)),
                                works(lambda p: np.array_equal(p, _fitted().predict(_X())))),
    "predict: nested lists": (lambda: _fitted().predict(_X()[:3].tolist()), works(lambda p: _decisions(p, 3))),
    "predict: uint8 images": (lambda: _fitted().predict((_X() * 255).astype(np.uint8)),
                              warns("uint8", lambda p: _decisions(p, 60))),
    "predict: int16 pixel images": (lambda: _fitted().predict((_X() * 255).astype(np.int16)),
                                    warns("int16 images", lambda p: _decisions(p, 60))),
    "predict: a backbone that edits its input in place": (_predict_with_inplace_backbone,
                                                          works(lambda unchanged: unchanged)),
    "predict: NaN images": (lambda: _fitted().predict(np.full_like(_X()[:2], np.nan)), raises(ValueError, "NaN")),
    "predict: inf images": (lambda: _fitted().predict(np.full_like(_X()[:2], np.inf)), raises(ValueError, "infinity")),
    "predict: finite images whose activations overflow": (lambda: _fitted().predict(_X()[:2] * 1e30),
                                                          works(lambda p: (p == -1).all())),
    "predict: large finite images (the power transform overflows)": (lambda: _fitted().predict(_X()[:4] * 1e8),
                                                                     works(lambda p: (p == -1).all())),
    "predict: a negative-stride array": (lambda: _fitted().predict(_X()[::-1, :, :, ::-1]),
                                         works(lambda p: np.array_equal(p, _fitted().predict(
                                             np.ascontiguousarray(_X()[::-1, :, :, ::-1]))))),
    "predict: a bfloat16 tensor": (lambda: _fitted().predict(torch.from_numpy(_X()).bfloat16()),
                                   works(lambda p: _decisions(p, 60))),
    "predict: a generator of images": (lambda: _fitted().predict(x for x in _X()),
                                       raises(ValueError, f"{OWNER} got a generator of images")),
    "predict: one image without a batch axis": (lambda: _fitted().predict(_X()[0]), raises(ValueError, "add a batch axis")),
    "predict: channels-last": (lambda: _fitted().predict(_X()[:2].transpose(0, 2, 3, 1)), raises(ValueError, "channels-last")),
    "predict: grayscale": (lambda: _fitted().predict(_X()[:2, :1]), raises(ValueError, "fitted on images with 3 channels")),
    "predict: 1x1 images": (lambda: _fitted().predict(np.zeros((2, 3, 1, 1), np.float32)),
                            raises(ValueError, r"fitted on images of shape \(3, 12, 12\)")),
    "predict: larger images": (lambda: _fitted().predict(np.zeros((2, 3, 48, 48), np.float32)),
                               raises(ValueError, r"fitted on images of shape \(3, 12, 12\)")),
    "predict: 2-D array": (lambda: _fitted().predict(np.zeros((2, 3))), raises(ValueError, "takes images of shape")),
    "predict: strings": (lambda: _fitted().score_samples(np.array([["a"]])), raises(ValueError, "takes images of shape")),
    "predict: a DataLoader": (lambda: _fitted().predict(_loader(torch.from_numpy(_X()))),
                              works(lambda p: np.array_equal(p, _fitted().predict(_X())))),
    "predict: a DataLoader of other-size images": (lambda: _fitted().predict(_loader(torch.zeros(4, 3, 16, 16))),
                                                   raises(ValueError, "batch 0 has images of shape")),
    "predict: an empty DataLoader": (lambda: _fitted().predict(_loader(torch.zeros(0, 3, 12, 12))),
                                     raises(ValueError, "found no images")),
    "decision_function: a tensor": (lambda: _fitted().decision_function(torch.from_numpy(_X()[:3])),
                                    works(lambda d: np.allclose(d, _fitted().score_samples(_X()[:3]) - _fitted().offset_))),
    "predict after a pickle round trip": (lambda: pickle.loads(pickle.dumps(_fitted())).predict(_X()),
                                          works(lambda p: np.array_equal(p, _fitted().predict(_X())))),
    "export before fit": (lambda: _det().export_split(), raises(Exception, "not fitted yet")),
    # --- partial_fit -----------------------------------------------------------------------------------
    "partial_fit: labels, then none": (lambda: _det().partial_fit(_X()[:30], _y()[:30]).partial_fit(_X()[30:]),
                                       raises(ValueError, "with every batch or with none")),
    "partial_fit: numbers, then strings": (lambda: _det().partial_fit(_X()[:30], _y()[:30]).partial_fit(
        _X()[30:], np.array(list("abc"))[_y()[30:]]), raises(ValueError, "labels of one type")),
    "partial_fit: one image first": (lambda: _det().partial_fit(_X()[:1]), raises(ValueError, f"{OWNER} needs at least 2")),
    "partial_fit: other-size images later": (lambda: _det().partial_fit(_X()).partial_fit(np.zeros((2, 3, 16, 16), np.float32)),
                                             raises(ValueError, r"fitted on images of shape \(3, 12, 12\)")),
    "partial_fit: after set_params(layer=...)": (lambda: _det().partial_fit(_X()).set_params(layer="stem").partial_fit(_X()),
                                                 raises(ValueError, "partial_fit: layer")),
    "partial_fit: after set_params(pooling=...)": (lambda: _det().partial_fit(_X()).set_params(pooling="max").partial_fit(
        _X()), raises(ValueError, "partial_fit: pooling changed")),
    "partial_fit: after set_params(backbone=...)": (lambda: _det().partial_fit(_X()).set_params(
        backbone=make_tiny_cnn(seed=3)).partial_fit(_X()), raises(ValueError, "partial_fit: backbone")),
    "partial_fit: after set_params(metric=...)": (lambda: _det().partial_fit(_X()[:30]).set_params(
        metric="euclidean").partial_fit(_X()[30:]), works(lambda e: e.moments_.n_rows == 60
                                                          and e.pipeline_["distance"].metric == "euclidean")),
    "partial_fit: a later batch whose features overflow the power transform": (
        lambda: _det().partial_fit(_X()).partial_fit(_X()[:4] * 1e8), raises(ValueError, "power transform")),
    "partial_fit, then fit: fit starts over": (lambda: _det().partial_fit(_X()[:30], _y()[:30]).fit(_X(), _y()),
                                               works(lambda e: e.moments_.n_rows == 60)),
    # --- the array steps -------------------------------------------------------------------------------
    "DistanceDetector: 1-D X": (lambda: DistanceDetector().fit(np.ones(5)), raises(ValueError, "Expected 2D array")),
    "DistanceDetector: NaN": (lambda: DistanceDetector().fit(np.array([[np.nan, 1], [1, 2], [3, 4]])),
                              raises(ValueError, "NaN")),
    "DistanceDetector: y of another length": (lambda: DistanceDetector().fit(np.random.rand(10, 2), np.zeros(3)),
                                              raises(ValueError, "10 samples but y has 3")),
    "DistanceDetector: other columns at predict": (lambda: DistanceDetector().fit(np.random.rand(10, 2)).predict(
        np.random.rand(3, 3)), raises(ValueError, "expecting 2 features")),
    "DistanceDetector: one row": (lambda: DistanceDetector().fit(np.ones((1, 3))), raises(ValueError, "at least 2")),
    "DistanceDetector: identical rows": (lambda: DistanceDetector().fit(np.ones((10, 3))), raises(ValueError, "do not vary")),
    "DistanceDetector: identical rows, euclidean": (lambda: DistanceDetector(metric="euclidean").fit(np.ones((10, 3))),
                                                    works(lambda d: (d.predict(np.ones((2, 3))) == 1).all()
                                                          and (d.predict(np.full((2, 3), 5.0)) == -1).all())),
    "ChannelSelector: fisher without y": (lambda: ChannelSelector(criterion="fisher").fit(np.random.rand(10, 3)),
                                          raises(ValueError, "needs class labels")),
    "ChannelSelector: more channels than columns": (lambda: ChannelSelector(n_channels=9).fit(np.random.rand(10, 3)),
                                                    warns("all are kept", lambda s: s.channels_.tolist() == [0, 1, 2])),
    "BackboneFeatures: 2-D images": (lambda: BackboneFeatures(_net(), "layer1").fit(np.random.rand(4, 3)),
                                     raises(ValueError, "BackboneFeatures: the backbone could not run")),
    "KNNDetector: more neighbours than images": (lambda: KNNDetector(k=500).fit(np.random.rand(10, 3)),
                                                 warns("capped|neighbour|k=", lambda k: k.n_neighbors_ == 9)),
    "load_split: a directory that is not a split": (lambda: load_split("/nonexistent-dir"),
                                                    raises(FileNotFoundError, "not found")),
    # --- calibrate_threshold: held-out ID images (on a copy: it moves the threshold) ---------------------------
    "calibrate_threshold: before fit": (lambda: _det().calibrate_threshold(_X()), raises(NotFittedError, "not fitted")),
    "calibrate_threshold: NaN in images": (lambda: _copy().calibrate_threshold(np.where(_X() > 0.9, np.nan, _X())),
                                           raises(ValueError, "NaN")),
    "calibrate_threshold: no images": (lambda: _copy().calibrate_threshold(_X()[:0]), raises(ValueError, "0 sample")),
    "calibrate_threshold: a DataLoader of (image, label)": (
        lambda: _copy().calibrate_threshold(_loader(*map(torch.from_numpy, _held_out()))),
        works(lambda d: np.sum(d.predict(_held_out()[0]) == -1) == 6)),  # floor(120 * 5%) of the calibration images
    "calibrate_threshold: 20 images": (lambda: _copy().calibrate_threshold(_X()[:20]),
                                       warns("at least 100 samples",
                                             lambda d: np.sum(d.predict(_X()[:20]) == -1) == 1)),
    "calibrate_threshold: images of another size": (lambda: _copy().calibrate_threshold(_X()[:, :, :8, :8]),
                                                    raises(ValueError, r"fitted on images of shape \(3, 12, 12\)")),
}


def _copy():
    return copy.deepcopy(_fitted())


@lru_cache(maxsize=None)
def _held_out():
    return make_images(120, seed=9)


def _dask_shards():
    from earlin_sklearn import DaskShards

    return DaskShards(TensorDataset(torch.from_numpy(_X())), client=object())  # refused before the client is used


def _det_on(device):
    return ShallowFeatureOODDetector(_net(), "layer1", device=device)


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
def test_bad_input_table(row):
    call, (kind, what, check) = ROWS[row]
    if kind == "raises":
        with pytest.raises(what, match=check):
            call()
    elif kind == "warns":
        with pytest.warns((EarlinWarning, UserWarning), match=what):
            result = call()
        assert check(result)
    else:
        assert check(call())


def test_the_table_is_wide():
    assert len(ROWS) >= 90
    kinds = [spec[0] for _, spec in ROWS.values()]
    assert kinds.count("raises") >= 50 and kinds.count("works") >= 20
