"""Streaming and distributed fits: statistics merge exactly, so any batching or sharding gives one detector."""

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from torch.utils.data import DataLoader, TensorDataset

import earlin_sklearn._moments as moments_module
from earlin_sklearn import ChannelSelector, DistanceDetector, ShallowFeatureOODDetector
from earlin_sklearn._distance import ledoit_wolf_covariance
from earlin_sklearn._moments import FeatureMoments
from earlin_sklearn.models import cifar_resnet


def _rows(n=400, dim=6, classes=3, seed=0):
    rng = np.random.RandomState(seed)
    y = rng.randint(0, classes, n)
    X = rng.randn(n, dim) @ rng.randn(dim, dim) + 3.0 * y[:, None] + 100.0  # an offset tests the merge's accuracy
    return X, y


@pytest.mark.parametrize("n_features", [1, 2, 9])
def test_ledoit_wolf_from_sums_equals_scikit_learn(n_features):
    R = np.random.RandomState(n_features).randn(50, n_features) * np.arange(1, n_features + 1)
    fourth = np.sum(np.sum(R**2, axis=1) ** 2)
    np.testing.assert_allclose(ledoit_wolf_covariance(R.T @ R, R.shape[0], fourth),
                               LedoitWolf(assume_centered=True).fit(R).covariance_, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sizes", [[400], [1, 399], [37] * 10 + [30], [200, 200]])
def test_moments_of_batches_equal_moments_of_all_rows(sizes):
    X, y = _rows()
    whole = FeatureMoments(X.shape[1], n_folds=5).update(X, y)
    parts = FeatureMoments(X.shape[1], n_folds=5)
    start = 0
    for size in sizes:
        parts.update(X[start: start + size], y[start: start + size])
        start += size
    np.testing.assert_array_equal(parts.counts, whole.counts)
    np.testing.assert_allclose(parts.means, whole.means, rtol=1e-13)
    np.testing.assert_allclose(parts.scatter, whole.scatter, rtol=1e-10, atol=1e-9)
    np.testing.assert_array_equal(parts.sample_rows, whole.sample_rows)
    # the pooled scatter is the two-pass one, despite the offset of 100
    slots, counts, means, scatter = whole.model()
    labels = whole.class_labels()
    two_pass = sum((X[y == c] - X[y == c].mean(0)).T @ (X[y == c] - X[y == c].mean(0)) for c in labels)
    np.testing.assert_allclose(scatter, two_pass, rtol=1e-10)
    np.testing.assert_allclose(means, [X[y == c].mean(0) for c in labels], rtol=1e-13)


def test_shards_merge_to_the_single_pass_statistics_and_sample():
    X, y = _rows(n=500)
    whole = FeatureMoments(X.shape[1], n_folds=3, reservoir_size=120).update(X, y)
    shards = [FeatureMoments(X.shape[1], n_folds=3, reservoir_size=120, start=s).update(X[s: s + 130], y[s: s + 130])
              for s in range(0, 500, 130)]
    merged = shards[0]
    for shard in shards[1:]:
        merged.merge(shard)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_allclose(merged.means, whole.means, rtol=1e-13)
    np.testing.assert_allclose(merged.scatter, whole.scatter, rtol=1e-10, atol=1e-9)
    assert merged.sample_rows.shape == (120, X.shape[1])  # bounded, and the same rows wherever they were read
    assert sorted(map(tuple, merged.sample_rows)) == sorted(map(tuple, whole.sample_rows))


def test_the_sample_is_uniform_over_the_stream():
    moments = FeatureMoments(1, reservoir_size=1000).update(np.arange(20_000.0)[:, None])
    assert moments.sample_rows.shape == (1000, 1)
    # a uniform sample of 0..19999 has a mean near 10000 (standard error 182)
    assert abs(moments.sample_rows.mean() - 9999.5) < 4 * 182


def test_labels_for_some_batches_only_are_refused():
    X, y = _rows()
    det = DistanceDetector().partial_fit(X[:100], y[:100])
    with pytest.raises(ValueError, match="with every batch or with none"):
        det.partial_fit(X[100:200])


@pytest.mark.parametrize("metric", ["mahalanobis", "euclidean", "cosine"])
@pytest.mark.parametrize("labelled", [True, False])
def test_distance_detector_partial_fit_equals_fit(metric, labelled):
    X, y = _rows()
    y = y if labelled else None
    whole = DistanceDetector(metric=metric).fit(X, y)
    parts = DistanceDetector(metric=metric)
    for s in range(0, X.shape[0], 33):
        parts.partial_fit(X[s: s + 33], None if y is None else y[s: s + 33])
    assert parts.offset_ == pytest.approx(whole.offset_, rel=1e-9)
    np.testing.assert_allclose(parts.centroids_, whole.centroids_, rtol=1e-12)
    np.testing.assert_allclose(parts.score_samples(X), whole.score_samples(X), rtol=1e-8)
    if metric == "mahalanobis":  # the same as Ledoit-Wolf on the residuals of all rows at once
        residual = X - whole.centroids_[np.searchsorted(whole.classes_, y)] if labelled else X - X.mean(0)
        from scipy.linalg import pinvh
        np.testing.assert_allclose(whole.precision_, pinvh(LedoitWolf(assume_centered=True).fit(residual).covariance_),
                                   rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("criterion", ["fisher", "variance"])
def test_channel_selector_partial_fit_equals_fit(criterion):
    X, y = _rows()
    whole = ChannelSelector(n_channels=3, criterion=criterion).fit(X, y)
    parts = ChannelSelector(n_channels=3, criterion=criterion)
    for s in range(0, X.shape[0], 50):
        parts.partial_fit(X[s: s + 50], y[s: s + 50])
    np.testing.assert_allclose(parts.scores_, whole.scores_, rtol=1e-10)
    np.testing.assert_array_equal(parts.channels_, whole.channels_)
    if criterion == "variance":
        np.testing.assert_allclose(whole.scores_, X.var(axis=0), rtol=1e-12)


def _images(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


def _net():
    torch.manual_seed(0)
    return cifar_resnet(20)


def test_fit_on_a_loader_in_small_batches_equals_fit_on_the_array():
    X, y = _images()
    net = _net()
    whole = ShallowFeatureOODDetector(net, "layer1", device="cpu").fit(X.numpy(), y.numpy())
    streamed = ShallowFeatureOODDetector(net, "layer1", device="cpu").fit(
        DataLoader(TensorDataset(X, y), batch_size=7))
    assert streamed.offset_ == whole.offset_
    np.testing.assert_array_equal(streamed.score_samples(X[:40]), whole.score_samples(X[:40]))


def test_partial_fit_in_batches_equals_one_fit():
    X, y = _images()
    net = _net()
    whole = ShallowFeatureOODDetector(net, "layer1", device="cpu", gaussianize=None).fit(X.numpy(), y.numpy())
    parts = ShallowFeatureOODDetector(net, "layer1", device="cpu", gaussianize=None)
    for s in range(0, 240, 50):
        parts.partial_fit(X[s: s + 50].numpy(), y[s: s + 50].numpy())
    assert parts.offset_ == pytest.approx(whole.offset_, rel=1e-9)
    np.testing.assert_allclose(parts.score_samples(X[:40].numpy()), whole.score_samples(X[:40].numpy()), rtol=1e-9)
    # the edge module exported after partial_fit decides as the estimator does
    edge, _ = parts.export_split()
    out = edge(X[:40])
    np.testing.assert_array_equal(out.is_id.numpy(), parts.predict(X[:40].numpy()) == 1)


def test_more_rows_than_the_sample_run_the_backbone_once_and_still_match(monkeypatch):
    monkeypatch.setattr(moments_module, "RESERVOIR_SIZE", 100)
    X, y = _images()
    net = _net()
    calls = []
    hook = net.conv1.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    streamed = ShallowFeatureOODDetector(net, "layer1", device="cpu").fit(
        DataLoader(TensorDataset(X, y), batch_size=16))
    hook.remove()
    # one image to probe the layer, then one pass over the 240 images: the second pass (statistics of the
    # transformed features) reads the pooled features back from a temporary file
    assert sum(calls) == 1 + 240
    assert streamed.moments_.n_rows == 240 and streamed.moments_.sample_rows.shape[0] == 100
    whole = ShallowFeatureOODDetector(net, "layer1", device="cpu").fit(X.numpy(), y.numpy())
    assert streamed.offset_ == pytest.approx(whole.offset_, rel=1e-9)
    # the threshold comes from a sample of 100 rows: the training acceptance is still near the target
    assert abs((streamed.predict(X.numpy()) == 1).mean() - 0.95) < 0.06


def test_partial_fit_after_load_goes_on(tmp_path):
    from earlin_sklearn import load_detector, save_detector

    X, y = _images()
    net = _net()
    first = ShallowFeatureOODDetector(net, "layer1", device="cpu", gaussianize=None).partial_fit(X[:120].numpy(),
                                                                                                 y[:120].numpy())
    save_detector(first, tmp_path / "d")
    loaded = load_detector(tmp_path / "d", net).partial_fit(X[120:].numpy(), y[120:].numpy())
    whole = ShallowFeatureOODDetector(net, "layer1", device="cpu", gaussianize=None).fit(X.numpy(), y.numpy())
    assert loaded.offset_ == pytest.approx(whole.offset_, rel=1e-9)


def test_partial_fit_checks_later_batches_against_the_first():
    X, y = _images(60)
    det = ShallowFeatureOODDetector(_net(), "layer1", device="cpu").partial_fit(X.numpy(), y.numpy())
    with pytest.raises(ValueError, match="ShallowFeatureOODDetector"):
        det.partial_fit(torch.rand(5, 3, 16, 16).numpy())
    with pytest.raises(ValueError, match="samples but y has"):
        det.partial_fit(X[:5].numpy(), y[:4].numpy())


@pytest.mark.parametrize("sample_size", [None, 100], ids=["one pass", "two passes"])
def test_fit_on_a_dask_cluster_equals_the_single_process_fit(sample_size, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from earlin_sklearn import DaskShards

    if sample_size is not None:  # more images than the sample: the transform's pass, then the statistics' pass
        monkeypatch.setattr(moments_module, "RESERVOIR_SIZE", sample_size)
    X, y = _images()
    net = _net()
    whole = ShallowFeatureOODDetector(net, "layer1", device="cpu").fit(X.numpy(), y.numpy())
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  host="127.0.0.1") as cluster, distributed.Client(cluster) as client:
        sharded = ShallowFeatureOODDetector(net, "layer1", device="cpu").fit(
            DaskShards(TensorDataset(X, y), client=client, n_shards=5))
        workers = client.run(lambda: 1)
        left = client.run(lambda: len(__import__("earlin_sklearn._distributed", fromlist=["x"])._WORKER_SPILLS))
    assert len(workers) == 2
    assert set(left.values()) == {0}  # the kept features are deleted after the fit
    assert sharded.moments_.n_rows == 240
    assert sharded.offset_ == pytest.approx(whole.offset_, rel=1e-9)
    np.testing.assert_allclose(sharded.score_samples(X[:40].numpy()), whole.score_samples(X[:40].numpy()), rtol=1e-9)


def test_partial_fit_refuses_an_estimator_fitted_without_statistics():
    X, y = _rows()
    old = DistanceDetector().fit(X, y)
    del old.moments_  # as an earlier version pickled it
    with pytest.raises(ValueError, match="earlier earlin_sklearn"):
        old.partial_fit(X, y)


def test_dask_workers_get_roomy_allocator_thresholds_for_a_task_and_back(monkeypatch):
    import earlin_sklearn._distributed as distributed_module

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(distributed_module, "glibc", lambda: FakeLibc())
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with distributed_module.roomy_allocator():  # not a Dask worker's environment: nothing changes
        pass
    assert calls == []
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as Dask's nanny sets it
    with distributed_module.roomy_allocator():
        assert calls == [(-3, 32 << 20), (-1, 64 << 20)]
    assert calls[2:] == [(-1, 65536), (-3, 128 * 1024)]  # Dask's values again
