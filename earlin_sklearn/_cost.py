"""Cost model: what a split costs (parameters, FLOPs, payload bytes) and what collaborative inference saves."""

import importlib.util
from dataclasses import asdict, dataclass, field
from numbers import Real
from typing import Any

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions, validate_params
from torch.utils.flop_counter import FlopCounterMode

from .edge._wire import dequantize_uint8, encoded_size, quantize_uint8, transfer_seconds



PAYLOADS = ("float32", "float16", "int8", "float16+zstd", "int8+zstd")
RAWS = ("uint8", "float32", "png", "jpeg")


def count_flops(module, *args):
    """FLOPs (multiply and add counted separately) of one call, from ``torch.utils.flop_counter``.

    Counts convolutions and matrix products, which dominate CNN cost;
    element-wise operations (activations, pooling, additions) are not counted.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return int(counter.get_total_flops())


def flops_at_returns(module, names, *args):
    """FLOPs (as :func:`count_flops`) the forward pass has run when each module of ``names`` first returns.

    One call of ``module``: ``({name: FLOPs so far}, total FLOPs)``. For a cut
    point that is the cost of :func:`split_model`'s edge part up to it (the
    prefix computes exactly what runs before the cut), for every cut point at
    once. Modules that never ran are missing from the dict.
    """
    at = {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        def recorder(name):
            def record(_module, _args, _output):
                at.setdefault(name, int(counter.get_total_flops()))
            return record

        handles = [module.get_submodule(name).register_forward_hook(recorder(name)) for name in dict.fromkeys(names)]
        try:
            module(*args)
        finally:
            for handle in handles:
                handle.remove()
    return at, int(counter.get_total_flops())


def count_parameters(module):
    return int(sum(p.numel() for p in module.parameters()))


@dataclass
class SplitCost:
    """Per-input costs of an edge/cloud split. Print it for a table.

    Bytes are per input; ``raw_uint8`` is the image as 8-bit pixels (what a
    camera would send, before any image compression), ``raw_float32`` the
    normalized tensor. ``payload_int8`` adds 8 bytes per tensor for the
    quantization scale and offset. The compressed sizes are means over the
    sample inputs, measured (NaN when not measured): ``raw_png`` and
    ``raw_jpeg`` (quality 90) from the camera images given to
    :func:`split_cost`, ``payload_*_zstd`` the activation bodies entropy-coded
    with Zstandard (level 3), one input per body as the edge runner sends them.
    """

    edge_params: int
    cloud_params: int
    detector_values: int
    edge_flops: int
    detector_flops: int
    cloud_flops: int
    full_flops: int
    raw_uint8_bytes: int
    raw_float32_bytes: int
    payload_float32_bytes: int
    payload_float16_bytes: int
    payload_int8_bytes: int
    payload_shapes: list = field(default_factory=list)
    raw_png_bytes: float = float("nan")
    raw_jpeg_bytes: float = float("nan")
    payload_float16_zstd_bytes: float = float("nan")
    payload_int8_zstd_bytes: float = float("nan")
    float16_agreement: float = float("nan")
    int8_agreement: float = float("nan")
    accuracy_float32: float = float("nan")
    accuracy_float16: float = float("nan")
    accuracy_int8: float = float("nan")
    n_eval: int = 0

    @property
    def edge_flops_fraction(self):
        return (self.edge_flops + self.detector_flops) / self.full_flops

    def to_dict(self):
        d = asdict(self)
        d["edge_flops_fraction"] = self.edge_flops_fraction
        return d

    def __str__(self):
        def kb(b):
            return f"{b / 1024:.1f} KiB" if b >= 1024 else f"{b} B"

        raw = self.raw_uint8_bytes
        lines = [
            f"{'part':<22}{'parameters':>12}{'MFLOPs/input':>14}{'share of FLOPs':>16}",
            f"{'edge: backbone prefix':<22}{self.edge_params:>12,}{self.edge_flops / 1e6:>14.2f}{100 * self.edge_flops / self.full_flops:>15.1f}%",
            f"{'edge: detector head':<22}{self.detector_values:>12,}{self.detector_flops / 1e6:>14.4f}{100 * self.detector_flops / self.full_flops:>15.2f}%",
            f"{'cloud: the rest':<22}{self.cloud_params:>12,}{self.cloud_flops / 1e6:>14.2f}{100 * self.cloud_flops / self.full_flops:>15.1f}%",
            "",
            f"{'upload per input':<22}{'bytes':>12}{'x raw image':>14}  effect on the cloud output",
            f"{'raw image, uint8':<22}{kb(raw):>12}{1.0:>14.2f}",
            f"{'raw tensor, float32':<22}{kb(self.raw_float32_bytes):>12}{self.raw_float32_bytes / raw:>14.2f}",
            f"{'activations, float32':<22}{kb(self.payload_float32_bytes):>12}{self.payload_float32_bytes / raw:>14.2f}  exact"
            + (f" (accuracy {100 * self.accuracy_float32:.1f}%)" if not np.isnan(self.accuracy_float32) else ""),
            f"{'activations, float16':<22}{kb(self.payload_float16_bytes):>12}{self.payload_float16_bytes / raw:>14.2f}  "
            + self._effect(self.float16_agreement, self.accuracy_float16),
            f"{'activations, int8':<22}{kb(self.payload_int8_bytes):>12}{self.payload_int8_bytes / raw:>14.2f}  "
            + self._effect(self.int8_agreement, self.accuracy_int8),
            f"(payload tensors per input: {self.payload_shapes})",
        ]
        measured = [(name, b) for name, b in (("raw image, PNG", self.raw_png_bytes),
                                              ("raw image, JPEG q90", self.raw_jpeg_bytes),
                                              ("activations, f16+zstd", self.payload_float16_zstd_bytes),
                                              ("activations, int8+zstd", self.payload_int8_zstd_bytes))
                    if not np.isnan(b)]
        if measured:
            lines.insert(-1, "compressed (mean over the sample inputs):")
            for name, b in measured:
                lines.insert(-1, f"{name:<22}{kb(int(round(b))):>12}{b / raw:>14.2f}")
        if self.payload_float32_bytes > self.raw_float32_bytes:
            lines.append("note: the float32 activations are LARGER than the float32 input tensor: "
                         "uploading the raw input can be cheaper (see collaborative_cost).")
        return "\n".join(lines)

    def _effect(self, agreement, accuracy):
        if np.isnan(agreement):
            return "not measured"
        text = f"top-1 agrees on {100 * agreement:.1f}% of {self.n_eval}"
        if not np.isnan(accuracy):
            text += f", accuracy {100 * accuracy:.1f}%"
        return text


def _mean_size(bodies):
    return float(np.mean([len(b) for b in bodies]))


def split_cost(edge: torch.nn.Module, cloud: torch.nn.Module, X: Any, y: Any = None,
               backbone: "torch.nn.Module | None" = None, images: Any = None) -> "SplitCost":
    """Measure the costs of a split on sample inputs.

    Parameters
    ----------
    edge : EdgeModule
    cloud : CloudModule
        From :meth:`ShallowFeatureOODDetector.export_split`.
    X : tensor or array of shape (N, C, H, W)
        Sample inputs, normalized as the model expects. FLOPs are counted on
        the first one; the payload's float16 and 8-bit versions are sent
        through the cloud part for all of them and compared with float32.
    y : array-like of shape (N,), default=None
        Labels: the accuracy of each payload precision is reported too.
    backbone : torch.nn.Module, default=None
        The whole model, for its FLOPs; by default edge prefix + cloud.
    images : array of shape (N, H, W, C), uint8, default=None
        The camera images that ``X`` was made from: their PNG and JPEG sizes
        are measured, what a camera would upload without EARLIN. The
        Zstandard sizes of the activations are measured whenever
        ``zstandard`` is installed.

    Returns
    -------
    cost : SplitCost

    Examples
    --------
    >>> import numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> from earlin_sklearn import collaborative_cost, split_cost
    >>> cost = split_cost(*det.export_split(), X[:8])
    >>> cost.payload_float32_bytes  # layer1 of ResNet-20: 16 x 32 x 32 float32 values per input
    65536
    >>> collaborative_cost(cost, ood_fraction=0.5, tpr=0.95, tnr=0.9).cheapest("bytes_per_input")
    'EARLIN, raw input (uint8)'
    """
    X = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X)
    x1 = X[:1]
    with torch.no_grad():
        taps, crossing = edge.taps_and_crossing(x1)
        pooled = edge.pooled(taps)
    edge_flops = count_flops(edge.prefix, x1)
    detector_flops = count_flops(edge.head, pooled)
    cloud_flops = count_flops(cloud.suffix, *crossing)
    full_flops = count_flops(backbone, x1) if backbone is not None else edge_flops + cloud_flops
    shapes = [tuple(t.shape[1:]) for t in crossing]
    n_raw = int(np.prod(x1.shape[1:]))

    cost = SplitCost(
        edge_params=count_parameters(edge.prefix),
        cloud_params=count_parameters(cloud.suffix),
        detector_values=int(sum(b.numel() for b in edge.head.buffers())),
        edge_flops=edge_flops,
        detector_flops=detector_flops,
        cloud_flops=cloud_flops,
        full_flops=full_flops,
        raw_uint8_bytes=n_raw,
        raw_float32_bytes=encoded_size([x1.shape[1:]], 1, "float32"),
        payload_float32_bytes=encoded_size(shapes, 1, "float32"),
        payload_float16_bytes=encoded_size(shapes, 1, "float16"),
        payload_int8_bytes=encoded_size(shapes, 1, "int8"),
        payload_shapes=[list(t.shape[1:]) for t in crossing],
        n_eval=int(X.shape[0]),
    )
    if images is not None:
        from .edge._wire import encode_image

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images are uint8 camera pixels (N, H, W, C); got {images.dtype} of shape {images.shape}.")
        cost.raw_png_bytes = _mean_size(encode_image(im, "png") for im in images)
        cost.raw_jpeg_bytes = _mean_size(encode_image(im, "jpeg", 90) for im in images)
    with torch.no_grad():
        payload = edge.taps_and_crossing(X)[1]
        ref = cloud.suffix(*payload)
        half = cloud.suffix(*[p.half().float() for p in payload])
        int8 = cloud.suffix(*[torch.from_numpy(dequantize_uint8(*quantize_uint8(p))) for p in payload])
    if importlib.util.find_spec("zstandard") is not None:
        from .edge._wire import compress, encode

        for encoding in ("float16", "int8"):
            sizes = [len(compress(encode([p[i:i + 1] for p in payload], encoding), "zstd")) for i in range(X.shape[0])]
            setattr(cost, f"payload_{encoding}_zstd_bytes", float(np.mean(sizes)))
    if ref.dim() == 2 and ref.shape[1] > 1:
        top = ref.argmax(1)
        cost.float16_agreement = float((half.argmax(1) == top).float().mean())
        cost.int8_agreement = float((int8.argmax(1) == top).float().mean())
        if y is not None:
            y = torch.as_tensor(np.asarray(y))
            cost.accuracy_float32 = float((top == y).float().mean())
            cost.accuracy_float16 = float((half.argmax(1) == y).float().mean())
            cost.accuracy_int8 = float((int8.argmax(1) == y).float().mean())
    return cost


@dataclass
class Strategy:
    name: str
    upload_fraction: float
    bytes_per_input: float
    latency_ms: float
    cloud_mflops_per_input: float
    edge_mflops_per_input: float


@validate_params(
    {
        "cost": [SplitCost],
        "ood_fraction": [Interval(Real, 0, 1, closed="both")],
        "tpr": [Interval(Real, 0, 1, closed="both")],
        "tnr": [Interval(Real, 0, 1, closed="both")],
        "uplink_mbit_s": [Interval(Real, 0, None, closed="neither")],
        "edge_gflop_s": [Interval(Real, 0, None, closed="neither")],
        "cloud_gflop_s": [Interval(Real, 0, None, closed="neither")],
        "payload": [StrOptions(set(PAYLOADS))],
        "raw": [StrOptions(set(RAWS))],
    },
    prefer_skip_nested_validation=True,
)
def collaborative_cost(
    cost: "SplitCost",
    ood_fraction: float,
    tpr: float,
    tnr: float,
    uplink_mbit_s: float = 10.0,
    edge_gflop_s: float = 5.0,
    cloud_gflop_s: float = 1000.0,
    payload: str = "float32",
    raw: str = "uint8",
) -> "CostComparison":
    """Expected per-input cost of three ways to serve a stream of inputs.

    (a) ``cloud only``: upload every raw input; the cloud runs the whole model.
    (b) ``EARLIN, activations``: the edge runs the prefix and the detector and
        uploads the cut activations of inputs it accepts; the cloud runs the rest.
    (c) ``EARLIN, raw input``: the edge runs the prefix and the detector and
        uploads the raw input of inputs it accepts; the cloud runs the whole model.

    An input is uploaded with probability ``(1 - ood_fraction) * tpr +
    ood_fraction * (1 - tnr)``. Latency is the expected time per input:
    edge compute, then (if uploaded) transfer and cloud compute; network
    round-trip time and the reply are left out (the same for every strategy).

    Parameters
    ----------
    cost : SplitCost
    ood_fraction : float
        Expected fraction of OOD inputs in the stream.
    tpr, tnr : float
        The detector's ID acceptance and OOD rejection rates (e.g. 0.95 and
        the measured TNR at 95% TPR).
    uplink_mbit_s : float, default=10
    edge_gflop_s, cloud_gflop_s : float, default=5 and 1000
        Sustained compute speed of each side, in GFLOP/s.
    payload : {"float32", "float16", "int8", "float16+zstd", "int8+zstd"}, default="float32"
        How the activations are sent; the ``+zstd`` sizes must have been
        measured by :func:`split_cost`.
    raw : {"uint8", "float32", "png", "jpeg"}, default="uint8"
        How a raw input is sent; ``"png"`` and ``"jpeg"`` (image files, what a
        camera uploads) need ``split_cost(..., images=...)``.

    Returns
    -------
    comparison : CostComparison

    Examples
    --------
    See :func:`split_cost` for a ``SplitCost``; then
    ``print(collaborative_cost(cost, ood_fraction=0.3, tpr=0.95, tnr=0.9))``
    prints the table of the three strategies.

    >>> from earlin_sklearn import SplitCost, collaborative_cost
    >>> cost = SplitCost(edge_params=0, cloud_params=0, detector_values=0, edge_flops=10**6, detector_flops=0,
    ...                  cloud_flops=9 * 10**6, full_flops=10**7, raw_uint8_bytes=3072, raw_float32_bytes=12288,
    ...                  payload_float32_bytes=65536, payload_float16_bytes=32768, payload_int8_bytes=16392)
    >>> round(collaborative_cost(cost, 0.5, 0.95, 0.9).strategies[2].upload_fraction, 3)
    0.525
    """
    raw_bytes = {"uint8": cost.raw_uint8_bytes, "float32": cost.raw_float32_bytes, "png": cost.raw_png_bytes,
                 "jpeg": cost.raw_jpeg_bytes}[raw]
    payload_bytes = {
        "float32": cost.payload_float32_bytes,
        "float16": cost.payload_float16_bytes,
        "int8": cost.payload_int8_bytes,
        "float16+zstd": cost.payload_float16_zstd_bytes,
        "int8+zstd": cost.payload_int8_zstd_bytes,
    }[payload]
    for name, value, how in ((f"raw={raw!r}", raw_bytes, "split_cost(..., images=camera_images)"),
                             (f"payload={payload!r}", payload_bytes, "split_cost with zstandard installed")):
        if np.isnan(value):
            raise ValueError(f"{name}: its size was not measured; measure it with {how}.")
    up = (1 - ood_fraction) * tpr + ood_fraction * (1 - tnr)
    edge_flops = cost.edge_flops + cost.detector_flops
    edge_s = edge_flops / (edge_gflop_s * 1e9)

    def transfer_s(n_bytes):
        return transfer_seconds(n_bytes, uplink_mbit_s)

    def cloud_s(flops):
        return flops / (cloud_gflop_s * 1e9)

    strategies = [
        Strategy("cloud only", 1.0, raw_bytes, 1e3 * (transfer_s(raw_bytes) + cloud_s(cost.full_flops)),
                 cost.full_flops / 1e6, 0.0),
        Strategy(f"EARLIN, activations ({payload})", up, up * payload_bytes,
                 1e3 * (edge_s + up * (transfer_s(payload_bytes) + cloud_s(cost.cloud_flops))),
                 up * cost.cloud_flops / 1e6, edge_flops / 1e6),
        Strategy(f"EARLIN, raw input ({raw})", up, up * raw_bytes,
                 1e3 * (edge_s + up * (transfer_s(raw_bytes) + cloud_s(cost.full_flops))),
                 up * cost.full_flops / 1e6, edge_flops / 1e6),
    ]
    settings = dict(ood_fraction=ood_fraction, tpr=tpr, tnr=tnr, uplink_mbit_s=uplink_mbit_s,
                    edge_gflop_s=edge_gflop_s, cloud_gflop_s=cloud_gflop_s)
    return CostComparison(strategies, settings)


@dataclass
class CostComparison:
    """The strategies of :func:`collaborative_cost`; print it for a table."""

    strategies: list
    settings: dict

    def cheapest(self, by="latency_ms"):
        """Name of the strategy with the lowest ``by`` (``"latency_ms"``,
        ``"bytes_per_input"`` or ``"cloud_mflops_per_input"``)."""
        return min(self.strategies, key=lambda s: getattr(s, by)).name

    def to_dict(self):
        return {"settings": self.settings, "strategies": [asdict(s) for s in self.strategies],
                "cheapest_latency": self.cheapest("latency_ms"), "cheapest_bytes": self.cheapest("bytes_per_input")}

    def __str__(self):
        s = self.settings
        lines = [
            f"stream: {100 * s['ood_fraction']:.0f}% OOD; detector TPR {100 * s['tpr']:.1f}%, TNR {100 * s['tnr']:.1f}%; "
            f"uplink {s['uplink_mbit_s']:g} Mbit/s; edge {s['edge_gflop_s']:g} GFLOP/s; cloud {s['cloud_gflop_s']:g} GFLOP/s",
            f"{'strategy':<36}{'uploaded':>9}{'bytes/input':>13}{'latency ms':>12}{'cloud MFLOPs':>14}{'edge MFLOPs':>13}",
        ]
        for st in self.strategies:
            lines.append(f"{st.name:<36}{100 * st.upload_fraction:>8.1f}%{st.bytes_per_input:>13.0f}"
                         f"{st.latency_ms:>12.3f}{st.cloud_mflops_per_input:>14.2f}{st.edge_mflops_per_input:>13.2f}")
        lines.append(f"cheapest: {self.cheapest('latency_ms')} (latency), {self.cheapest('bytes_per_input')} (bytes)")
        return "\n".join(lines)
