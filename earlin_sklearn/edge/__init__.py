"""The device side: what an edge device runs, and nothing else.

NumPy, the edge program's runtime (ONNX Runtime, or ExecuTorch's runtime
libraries) and httpx. Importing this subpackage never imports PyTorch or
scikit-learn; only ``runtime="torch"`` does, when asked for. Install it on a
device without them::

    pip install --no-deps earlin_sklearn
    pip install numpy onnxruntime httpx pillow        # ONNX programs
    pip install --no-deps executorch                   # .pte programs (and a C++ compiler, once)

- :class:`EdgeRunner`: decide on each input, upload the accepted ones to
  ``earlin serve-cloud`` (the wire format: ``_wire.py``);
- :func:`load_edge_program`: a split's edge file in a runtime, verified
  against its manifest (``_manifest.py``), as a numpy callable.
"""

from ._manifest import read_manifest, verified_bytes
from ._programs import PRECISIONS, RUNTIMES, EdgeProgram, choose_program, edge_programs, load_edge_program
from ._runner import (CloudRefused, CloudUnreachable, EdgeRecord, EdgeRunner, choose_upload, read_inputs, read_log,
                      summarize)

__all__ = ["CloudRefused", "CloudUnreachable", "EdgeProgram", "EdgeRecord", "EdgeRunner", "PRECISIONS", "RUNTIMES",
           "choose_program", "choose_upload", "edge_programs", "load_edge_program", "read_inputs", "read_log", "read_manifest",
           "summarize", "verified_bytes"]
