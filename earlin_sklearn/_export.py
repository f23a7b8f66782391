"""Export of the split model: torch.export (.pt2) and ONNX files, plus a JSON manifest.

The files need neither scikit-learn nor this package to run: ``edge.pt2``
loads with ``torch.export.load`` and ``edge.onnx`` runs in onnxruntime.
The edge file returns the flat tuple ``(is_id, score, *payload)``, the cloud
file takes ``*payload`` and returns the model's output.
"""

import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ._cost import count_flops

FORMATS = ("pt2", "onnx")


class FlatEdge(nn.Module):
    """:class:`EdgeModule` with a flat tuple output ``(is_id, score, *payload)``.

    Exported files cannot carry the :class:`EdgeOutput` named tuple (loading
    it would need this package), so the exported edge returns plain tensors.
    """

    def __init__(self, edge):
        super().__init__()
        self.edge = edge

    def forward(self, x):
        out = self.edge(x)
        payload = out.payload if isinstance(out.payload, tuple) else (out.payload,)
        return (out.is_id, out.score, *payload)


def _digest(module):
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_split(edge, cloud, directory, example_input, formats=FORMATS):
    """Write the edge and cloud modules as deployable files.

    Parameters
    ----------
    edge : EdgeModule
    cloud : CloudModule
        From :meth:`ShallowFeatureOODDetector.export_split`.
    directory : str or Path
        Created if missing. Receives ``edge.pt2``/``cloud.pt2`` (torch.export),
        ``edge.onnx``/``cloud.onnx`` and ``split.json``.
    example_input : tensor of shape (N, C, H, W)
        A batch of valid inputs; the batch dimension stays dynamic in the files.
    formats : sequence of {"pt2", "onnx"}, default=("pt2", "onnx")
        ONNX needs the ``onnx`` and ``onnxscript`` packages (``pip install earlin_sklearn[export]``).

    Returns
    -------
    paths : dict
        ``{"edge.pt2": Path, ..., "manifest": Path}``.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats must be among {FORMATS}; got {sorted(unknown)}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    x = torch.as_tensor(example_input)
    if x.shape[0] < 2:  # a batch of 1 would be specialized as a constant
        x = torch.cat([x, x])
    flat = FlatEdge(edge).eval()
    with torch.no_grad():
        outs = flat(x)
    payload = outs[2:]
    batch = torch.export.Dim("batch", min=1)
    edge_shapes = ({0: batch},)
    cloud_shapes = tuple({0: batch} for _ in payload)
    input_names = ["x"]
    edge_outputs = ["is_id", "score", *[f"payload_{i}" for i in range(len(payload))]]
    cloud_inputs = [f"payload_{i}" for i in range(len(payload))]
    paths = {}
    if "pt2" in formats:
        for name, module, args, shapes in (
            ("edge", flat, (x,), edge_shapes),
            ("cloud", cloud.suffix, tuple(payload), cloud_shapes),
        ):
            program = torch.export.export(module, args, dynamic_shapes=shapes)
            paths[f"{name}.pt2"] = directory / f"{name}.pt2"
            torch.export.save(program, paths[f"{name}.pt2"])
    if "onnx" in formats:
        with warnings.catch_warnings():
            # the exporter's notes on renamed dynamic axes are not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            for name, module, args, shapes, ins, outs_ in (
                ("edge", flat, (x,), edge_shapes, input_names, edge_outputs),
                ("cloud", cloud.suffix, tuple(payload), cloud_shapes, cloud_inputs, ["output"]),
            ):
                paths[f"{name}.onnx"] = directory / f"{name}.onnx"
                torch.onnx.export(
                    module, args, str(paths[f"{name}.onnx"]), dynamo=True, dynamic_shapes=shapes,
                    input_names=ins, output_names=outs_, verbose=False,
                )
    x1 = x[:1]
    edge_flops = count_flops(flat, x1)
    cloud_flops = count_flops(cloud.suffix, *[p[:1] for p in payload])
    manifest = {
        "format": "earlin-split/1",
        "input_shape": list(x.shape[1:]),
        "input_dtype": str(x.dtype).replace("torch.", ""),
        "pooling": edge.pooling,
        "layout": edge.layout,
        "metric": edge.head.metric,
        "offset": float(edge.head.offset),
        "payload": [
            {"name": n, "shape": list(p.shape[1:]), "dtype": str(p.dtype).replace("torch.", "")}
            for n, p in zip(cloud_inputs, payload)
        ],
        "flops": {"edge": edge_flops, "cloud": cloud_flops, "full": edge_flops + cloud_flops},
        "cloud_version": _digest(cloud),
        "edge_version": _digest(edge),
        "files": sorted(k for k in paths),
    }
    paths["manifest"] = directory / "split.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=2))
    return paths
