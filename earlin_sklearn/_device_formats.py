"""The edge part in the formats devices run: ExecuTorch programs (float32 and int8) and int8 ONNX.

- ``.pte``: ``torch.export`` then ExecuTorch's ``to_edge_transform_and_lower``
  with the XNNPACK partitioner, for the ExecuTorch runtime on Android, iOS and
  Linux devices. Exported at batch size 1 with a contiguous example: a
  program keeps the memory layout (dim order) of the input it was exported
  with, and a device decides one input at a time.
- int8: static post-training quantization of the backbone prefix only,
  calibrated on ID images the caller passes (never OOD data): PT2E with the
  XNNPACK quantizer for ``.pte``, ONNX Runtime's QDQ quantization for ONNX.
  The detector head stays as in the float program (pooling and whitening in
  float32, the Yeo-Johnson power in float64): it is what decides, and it
  costs little. Quantization moves the pooled features by a systematic
  bias (rounding of every activation range adds up through the layers); its
  mean over the calibration images is folded into the head
  (:meth:`DetectorHead.shifted`, no extra operation). The int8 program's
  threshold is set again on its own scores of ID images
  (:func:`int8_acceptance`), so it accepts what the float detector accepts.

Needs ``executorch`` (``.pte``) and ``onnx``/``onnxruntime`` (int8 ONNX) at
export time; the device needs only the runtime.
"""

import ast
import contextlib
import copy
import io
import os
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from ._edge import EdgeModule
from ._optional import require


# ONNX Runtime's activation ranges leave out the calibration values outside this central percentage (int8_onnx)
PERCENTILE = 99.999


class FlatEdge(nn.Module):
    """:class:`EdgeModule` with a flat tuple output ``(is_id, score, *payload)``.

    Exported files cannot carry the :class:`EdgeOutput` named tuple (loading
    it would need this package), so the exported edge returns plain tensors.
    With ``pooled=True`` the head's input (the pooled features) is a last
    output too: what the int8 formats compare between the float and the
    quantized prefix before they drop it.
    """

    def __init__(self, edge, pooled=False):
        super().__init__()
        self.edge = edge
        self.with_pooled = pooled

    def forward(self, x):
        if not self.with_pooled:
            out = self.edge(x)
            payload = out.payload if isinstance(out.payload, tuple) else (out.payload,)
            return (out.is_id, out.score, *payload)
        is_id, score, crossing, pooled = self.edge.outputs(x)
        return (is_id, score, *crossing, pooled)


class _NchwOutputs(nn.Module):
    """A quantized prefix whose outputs each pass through a flat reshape and back, once per distinct tensor.

    ExecuTorch 1.5's XNNPACK delegate hands a dequantized tensor that is both
    consumed inside the delegate (the pooling, in NHWC) and returned (the
    payload, the taps) back in NHWC order while the program declares it
    NCHW: loading works, the first run fails ("Attempted to resize a static
    tensor", pytorch/executorch#9749's family). A reshape is layout-bound, so
    the delegate converts each output to NCHW before it (one copy per output).
    A tensor the prefix returns twice (a ResNet's tap that is also its
    payload) gets one reshape pair that both share: with a pair each, the
    partitioner can leave the payload's pair out of the delegate, which then
    returns the dequantized tensor itself, and XNNPACK's layout pass fails
    once the head after it runs in float32 (``KeyError: 'val'``).
    """

    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix

    def forward(self, x):
        outputs, reshaped = list(self.prefix(x)), {}
        for t in outputs:
            if id(t) not in reshaped:
                reshaped[id(t)] = t.reshape(t.shape[0], -1).reshape(t.shape)
        return [reshaped[id(t)] for t in outputs]


class _Outputs(nn.Module):
    """A split prefix (an fx GraphModule returning a tuple) as a module for torch.export."""

    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix

    def forward(self, x):
        return tuple(self.prefix(x))


def _example(example_input):
    """One contiguous float32 input ``(1, C, H, W)``: the layout the programs are exported with."""
    return torch.as_tensor(example_input)[:1].to(torch.float32).contiguous()


def _batches(X, batch_size):
    X = torch.as_tensor(X).to(torch.float32)
    for i in range(0, X.shape[0], batch_size):
        yield X[i : i + batch_size].contiguous()


def executorch_program(module, example_input):
    """Bytes of an ExecuTorch program of ``module`` (returning tensors), lowered to XNNPACK, for batch size 1."""
    require("save_split(formats=('pte', ...))", "executorch", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = _example(example_input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExecuTorch's notes on deprecated torch features
        program = torch.export.export(module, (example,))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        return bytes(lowered.to_executorch().buffer)


def int8_edge(edge, calibration, example_input, correct_bias=True):
    """:class:`EdgeModule` whose prefix is quantized to int8 with PT2E (XNNPACK quantizer), calibrated on ``calibration``.

    Weights per channel and activations per tensor, symmetric int8, as
    XNNPACK runs them; the head is a copy of ``edge.head``, with
    ``correct_bias`` shifted by :func:`pooled_bias` on the calibration
    images (the lowered int8 program's own pooled features against the float
    ones: PyTorch's int8 reference rounds differently from XNNPACK).
    """
    require("save_split(formats=('pte-int8', ...))", "executorch", "executorch", "torchao")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = _example(example_input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prefix = torch.export.export(_Outputs(edge.prefix).eval(), (example,)).module()
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(prefix, quantizer)
        with torch.no_grad():
            for x in _batches(calibration, 1):  # the program's batch size: one input at a time
                prepared(x)
        quantized = convert_pt2e(prepared)
    allow_exported_model_train_eval(quantized)
    # the head as in the float program (float32 whitening, XNNPACK-delegated); _NchwOutputs makes that lowerable
    q = EdgeModule(_NchwOutputs(quantized), copy.deepcopy(edge.head), edge.pooling, n_extra=edge.n_extra,
                   layout=edge.layout)
    q.layer, q.extra_layers = getattr(edge, "layer", None), list(getattr(edge, "extra_layers", []))
    if correct_bias:  # the pooled features of the program XNNPACK runs (not of PyTorch's int8 reference)
        from .edge._programs import EdgeProgram

        probe = EdgeProgram("pooled.pte", {"runtime": "executorch", "batch": 1},
                            executorch_program(FlatEdge(q, pooled=True), example))
        got = probe(calibration.numpy())[2][-1]
        q.head = q.head.shifted(pooled_bias(pooled_features(edge, calibration), got))
    return q


def pooled_features(edge, X, batch_size=64):
    """The head's input (pooled features, float64 numpy) that the float ``edge`` computes for ``X``."""
    with torch.no_grad():
        return torch.cat([edge.pooled(edge.taps_and_crossing(x)[0]).double() for x in _batches(X, batch_size)]).numpy()


def pooled_bias(reference, quantized):
    """The mean of ``reference - quantized`` pooled features over the calibration images, per feature.

    What quantization shifts every feature by on average: added back by the
    head (:meth:`DetectorHead.shifted`). Set from the same ID images as the
    int8 ranges; an affine correction per feature was measured no better.
    """
    return (np.asarray(reference, dtype=np.float64) - np.asarray(quantized, dtype=np.float64)).mean(axis=0)


def onnx_program(module, example_input, input_names, output_names, dynamic_shapes):
    """The ONNX model (``onnx.ModelProto``) of ``module``, every weight inside it (no external data to seal)."""
    require("save_split(formats=('onnx', ...))", "export", "onnx", "onnxscript")
    import onnx

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # the exporter's notes on renamed dynamic axes are not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(module, example_input, path, dynamo=True, dynamic_shapes=dynamic_shapes,
                          input_names=input_names, output_names=output_names, verbose=False, external_data=False)
        model = onnx.load(path)
    return model


def strip_metadata(model):
    """``model`` without the exporter's per-node metadata (stack traces and source paths of the exporting machine)."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    model.doc_string = ""
    return model


def _in_prefix(node):
    """Whether the exporter attributes ``node`` to a module named ``prefix`` (``edge.prefix``, ``prefix``, ...)."""
    value = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
    return any(".prefix." in f".{scope}." for scope in ast.literal_eval(value))


def int8_onnx(model, calibration, input_name="x", batch_size=32):
    """The ONNX edge ``model`` with its backbone prefix quantized to int8 (QDQ), calibrated on ``calibration``.

    Only the nodes the exporter attributes to a ``prefix`` module (``edge.prefix``) are quantized
    (weights per channel int8, activations uint8); the pooling and the head
    stay float. Activation ranges: the central 99.999% of each tensor's
    calibration values (a histogram per tensor). On held-out ID images
    alone, the int8 scores' rank correlation with the float ones is higher
    with these ranges than with min-max ones on all three development models
    (docs/edge_deployment.rst);
    the decisions on ID and OOD inputs agreed more on ShuffleNetV2 and within
    0.2 points either way on the ResNets.
    """
    require("save_split(formats=('onnx-int8', ...))", "export", "onnx", "onnxruntime")
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    exclude = [n.name for n in model.graph.node if not _in_prefix(n)]
    if len(exclude) == len(model.graph.node):
        raise RuntimeError("the ONNX exporter no longer records which nodes belong to the prefix; cannot tell the "
                           "backbone from the detector head to quantize only the former.")

    # equal batches: the percentile calibrator stacks every batch's activations of a tensor into one array
    n = len(calibration)
    batch_size = max(b for b in range(1, min(batch_size, n) + 1) if n % b == 0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = (x.numpy() for x in _batches(calibration, batch_size))

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {input_name: x}

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (os.path.join(tmp, f) for f in ("float.onnx", "pre.onnx", "int8.onnx"))
        onnx.save_model(model, src)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        kept = {n.name for n in onnx.load(pre).graph.node}
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its progress
            quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            nodes_to_exclude=[n for n in exclude if n in kept],
                            calibrate_method=CalibrationMethod.Percentile,
                            extra_options={"CalibPercentile": PERCENTILE})
        return onnx.load(dst)


def int8_onnx_edge(edge, model, calibration, batch_size=64):
    """The int8 ONNX edge: ``model`` (``FlatEdge(edge, pooled=True)`` exported) quantized by :func:`int8_onnx`,
    its head shifted by :func:`pooled_bias` (ONNX Runtime's own int8 pooled features of the calibration images
    against the float ``edge``'s), and the pooled output dropped."""
    import onnxruntime as ort

    quantized = int8_onnx(model, calibration)
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"x": x.numpy()})[-1] for x in _batches(calibration, batch_size)])
    head = edge.head.shifted(pooled_bias(pooled_features(edge, calibration), got))
    name = head.shift_buffer
    set_onnx_buffers(quantized, {name: getattr(head, name).numpy()})
    return drop_last_output(quantized)


def drop_last_output(model):
    """``model`` (ONNX) without its last graph output (the pooled features of ``FlatEdge(..., pooled=True)``)."""
    del model.graph.output[-1]
    return model


def set_onnx_buffers(model, values):
    """``model`` (an ONNX edge) with the initializers of its head's buffers (``edge.head.<name>``) set to ``values``.

    Each value keeps its initializer's shape and dtype; a buffer the graph does not hold is an error.
    """
    from onnx import numpy_helper

    inits = {init.name.rsplit(".", 2)[-1]: init for init in model.graph.initializer
             if init.name.endswith(tuple(f"head.{name}" for name in values))}
    for name, value in values.items():
        if name not in inits:
            raise RuntimeError(f"the ONNX edge has no initializer 'edge.head.{name}' to set.")
        old = numpy_helper.to_array(inits[name])
        value = np.asarray(value, dtype=old.dtype)
        if value.shape != old.shape:
            raise ValueError(f"edge.head.{name} has shape {old.shape}; got {value.shape}.")
        inits[name].CopyFrom(numpy_helper.from_array(value, inits[name].name))
    return model


def set_onnx_threshold(model, offset):
    """``model`` (an ONNX edge) with its threshold initializer ``edge.head.offset`` set to ``offset``."""
    return set_onnx_buffers(model, {"offset": offset})


INT8_THRESHOLDS = ("match", "target_tpr")


def check_int8_threshold(rule, held_out):
    """Refuse an unknown ``int8_threshold`` rule, or ``"target_tpr"`` without held-out ID images."""
    if rule not in INT8_THRESHOLDS:
        raise ValueError(f"int8_threshold must be one of {INT8_THRESHOLDS}; got {rule!r}.")
    if rule == "target_tpr" and not held_out:
        raise ValueError("int8_threshold='target_tpr' sets the int8 thresholds on held-out ID images: pass "
                         "threshold_data (ID images the detector was not fitted on).")


def int8_acceptance(edge, images, target_tpr, rule="match", held_out=True):
    """``(rate, description)``: the share of the ID ``images`` each int8 program's own threshold accepts (no OOD data).

    ``"match"``: as many as the float detector's threshold accepts, so that
    the int8 program decides at the float detector's operating point (that
    threshold was set on out-of-fold training scores for ``target_tpr``).
    ``"target_tpr"``: ``target_tpr`` of them, which needs held-out images
    (that the detector was not fitted on): an operating point of its own,
    which on ResNet-20 alone moves 3.1% of even the float detector's
    decisions (docs/edge_deployment.rst).
    """
    check_int8_threshold(rule, held_out)
    which = "held-out ID images" if held_out else "the calibration images"
    if rule == "target_tpr":
        return float(target_tpr), f"target_tpr on {which}"
    with torch.no_grad():
        accepted = np.concatenate([edge(x).is_id.numpy() for x in _batches(images, 64)])
    return float(accepted.mean()), f"match: the float threshold's acceptance rate on {which}"
