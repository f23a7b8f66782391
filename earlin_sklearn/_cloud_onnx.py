"""The cloud server's parts in ONNX Runtime: ``cloud.onnx`` (and ``edge.onnx`` for raw inputs) instead of the ``.pt2``.

What the server calls them with and gets back is what it gets from the
PyTorch parts: ``cloud(*payload tensors)`` returns the logits tensor (or
``(logits, score, is_id)`` for a two-stage split) and ``edge(x).payload``
the cut activations. ONNX Runtime runs a whole graph per call without
Python between its operators and without the interpreter lock, so the
server's event loop keeps answering while a batch runs, and small batches
cost far less than an exported program run operator by operator in Python
(``docs/serving.rst``, the fleet benchmark). Scores and logits differ from
the PyTorch parts' by float32 rounding (about 1e-5 relative), never in
kind.

Both files are the split's own, checked against the manifest's sha256 and
loaded from those bytes (ONNX Runtime then refuses external data, which
the manifest would not seal).
"""

import torch

from ._constants import CLOUD_RUNTIMES
from ._edge import EdgeOutput
from .edge._manifest import verified_bytes
from .edge._programs import load_edge_program
from .exceptions import SplitVerificationError


class OnnxCloud:
    """``cloud.onnx`` in an ONNX Runtime session, called as the PyTorch cloud part is: ``cloud(*tensors)`` or
    ``cloud(payload)`` with a tensor or a tuple of them.

    Parameters
    ----------
    data : bytes
        The file's verified bytes.
    threads : int, default=1
        ONNX Runtime's intra-op threads.
    """

    def __init__(self, data, threads=1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
        # threads that wait spinning would take the cores from the event loop and the other workers
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own Fail/InvalidGraph types
            raise SplitVerificationError(f"cloud.onnx: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]}); "
                                         "refusing it.") from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *payload):
        if len(payload) == 1 and isinstance(payload[0], (tuple, list)):  # cloud(payload) as CloudModule takes it
            payload = tuple(payload[0])
        if len(payload) != len(self.inputs):
            raise ValueError(f"cloud.onnx takes {len(self.inputs)} payload tensors; got {len(payload)}.")
        feed = {name: t.detach().contiguous().numpy() for name, t in zip(self.inputs, payload)}
        outs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)


class OnnxEdge:
    """The float ``edge.onnx`` as an :class:`EdgeProgram`, called as the PyTorch edge part is:
    ``edge(x)`` -> EdgeOutput."""

    def __init__(self, program):
        self.program = program

    def __call__(self, x):
        is_id, score, payload = self.program(x.detach().numpy())
        tensors = tuple(torch.from_numpy(p) for p in payload)
        payload = tensors[0] if len(tensors) == 1 else tensors
        return EdgeOutput(torch.from_numpy(is_id), torch.from_numpy(score), payload)


def check_runtime(runtime, manifest=None, split_dir=None):
    """Refuse an unknown ``runtime``, and ``"onnxruntime"`` for a split (its verified ``manifest``) without
    ``cloud.onnx``."""
    if runtime not in CLOUD_RUNTIMES:
        raise ValueError(f"runtime must be one of {CLOUD_RUNTIMES}; got {runtime!r}.")
    if runtime == "onnxruntime" and manifest is not None and "cloud.onnx" not in manifest.get("files", {}):
        raise ValueError(f"runtime='onnxruntime' serves the split's cloud.onnx, which {split_dir} does not have: save "
                         "it with save_split(..., formats=(..., 'onnx')) (the default formats include it).")


def onnx_parts(split_dir, manifest, threads=1):
    """``(edge, cloud)`` of a verified split in ONNX Runtime: its float ``edge.onnx`` and its ``cloud.onnx``."""
    check_runtime("onnxruntime", manifest, split_dir)
    _, program = load_edge_program(split_dir, "onnxruntime", "float32", manifest=manifest, threads=threads)
    return OnnxEdge(program), OnnxCloud(verified_bytes(split_dir, manifest, "cloud.onnx"), threads)
