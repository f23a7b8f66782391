import numpy as np
import pytest
import torch

from earlin_sklearn import ShallowFeatureOODDetector, collaborative_cost, split_cost
from earlin_sklearn._cost import count_flops
from earlin_sklearn.edge._wire import dequantize_uint8, quantize_uint8
from earlin_sklearn.models import cifar_resnet


@pytest.fixture(scope="module")
def resnet_cost():
    torch.manual_seed(0)
    model = cifar_resnet(20)
    X = torch.randn(32, 3, 32, 32)
    det = ShallowFeatureOODDetector(model, "layer1", device="cpu").fit(X)
    edge, cloud = det.export_split()
    with torch.no_grad():
        y = model(X).argmax(1)
    return model, split_cost(edge, cloud, X, y=y, backbone=model)


def test_parts_add_up(resnet_cost):
    model, cost = resnet_cost
    assert cost.edge_params + cost.cloud_params == sum(p.numel() for p in model.parameters())
    assert cost.edge_flops + cost.cloud_flops == cost.full_flops
    # stem conv: 32*32 positions * 16 out * 3*3*3 MACs, x2 for multiply and add
    assert count_flops(model.conv1, torch.zeros(1, 3, 32, 32)) == 2 * 32 * 32 * 16 * 27
    assert 0.2 < cost.edge_flops_fraction < 0.5
    assert cost.detector_flops < 0.01 * cost.full_flops


def test_shallow_payload_is_larger_than_the_image_and_the_report_says_so(resnet_cost):
    _, cost = resnet_cost
    assert cost.raw_uint8_bytes == 3 * 32 * 32 and cost.raw_float32_bytes == 4 * 3 * 32 * 32
    assert cost.payload_float32_bytes == 4 * 16 * 32 * 32 and cost.payload_shapes == [[16, 32, 32]]
    assert cost.payload_float16_bytes == 2 * 16 * 32 * 32
    assert cost.payload_int8_bytes == 16 * 32 * 32 + 8
    text = str(cost)
    assert "LARGER than the float32 input" in text and "21.33" in text  # 64 KiB / 3 KiB


def test_quantized_payload_effect_is_measured(resnet_cost):
    _, cost = resnet_cost
    assert cost.accuracy_float32 == 1.0  # y was the model's own prediction
    assert 0.8 <= cost.int8_agreement <= 1.0 and 0.9 <= cost.float16_agreement <= 1.0
    assert cost.n_eval == 32


def test_uint8_quantization_round_trip():
    t = torch.randn(4, 8, 5, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0])[:, None, None, None]
    codes, scale, low = quantize_uint8(t)  # a torch tensor in, numpy out: the wire format is numpy only
    assert codes.dtype == np.uint8
    err = np.abs(dequantize_uint8(codes, scale, low) - t.numpy()).max(axis=(1, 2, 3))
    assert np.all(err <= scale / 2 + 1e-6)


def test_cost_model_arithmetic(resnet_cost):
    _, cost = resnet_cost
    cmp = collaborative_cost(cost, ood_fraction=0.5, tpr=1.0, tnr=1.0, uplink_mbit_s=8.0,
                             edge_gflop_s=1.0, cloud_gflop_s=1e6)
    cloud_only, acts, raw = cmp.strategies
    assert cloud_only.bytes_per_input == cost.raw_uint8_bytes and cloud_only.upload_fraction == 1.0
    assert acts.upload_fraction == 0.5 and acts.bytes_per_input == 0.5 * cost.payload_float32_bytes
    assert raw.bytes_per_input == 0.5 * cost.raw_uint8_bytes
    # 8 Mbit/s = 1 byte per microsecond
    assert cloud_only.latency_ms == pytest.approx(cost.raw_uint8_bytes / 1e3 + cost.full_flops / 1e15 * 1e3)
    edge_ms = (cost.edge_flops + cost.detector_flops) / 1e9 * 1e3
    assert acts.latency_ms == pytest.approx(edge_ms + 0.5 * (cost.payload_float32_bytes / 1e3 + cost.cloud_flops / 1e15 * 1e3))
    assert cmp.cheapest("bytes_per_input") == raw.name
    assert "cheapest" in str(cmp) and cmp.to_dict()["cheapest_bytes"] == raw.name


def test_cost_model_rejects_bad_rates(resnet_cost):
    with pytest.raises(ValueError, match="tnr"):
        collaborative_cost(resnet_cost[1], 0.3, 0.95, 1.5)


def test_compressed_sizes_are_measured_and_priced():
    pytest.importorskip("zstandard")
    import numpy as np

    from earlin_sklearn.edge._wire import compress, encode, encode_image

    torch.manual_seed(0)
    X = torch.rand(20, 3, 32, 32)
    images = (X.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)  # the camera pixels X came from
    det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(20) % 2)
    edge, cloud = det.export_split()
    cost = split_cost(edge, cloud, X, images=images)
    payload = edge.taps_and_crossing(X[:1])[1]
    assert cost.raw_png_bytes == pytest.approx(np.mean([len(encode_image(im, "png")) for im in images]))
    assert cost.payload_int8_zstd_bytes > 0 and cost.payload_float16_zstd_bytes > 0
    one = len(compress(encode(payload, "int8"), "zstd"))
    assert 0.5 * one < cost.payload_int8_zstd_bytes < 2 * one
    assert "raw image, PNG" in str(cost) and "int8+zstd" in str(cost)
    png = collaborative_cost(cost, 0.5, 0.95, 0.9, payload="int8+zstd", raw="png")
    assert png.strategies[0].bytes_per_input == pytest.approx(cost.raw_png_bytes)
    assert png.strategies[1].bytes_per_input == pytest.approx(png.strategies[1].upload_fraction * cost.payload_int8_zstd_bytes)
    without = split_cost(edge, cloud, X)
    with pytest.raises(ValueError, match="images=camera_images"):
        collaborative_cost(without, 0.5, 0.95, 0.9, raw="png")
    with pytest.raises(ValueError, match="uint8 camera pixels"):
        split_cost(edge, cloud, X, images=images.astype(np.float32))
