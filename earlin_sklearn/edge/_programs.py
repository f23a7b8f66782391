"""The edge part of a split in the runtime a device has: ONNX Runtime, ExecuTorch, or PyTorch.

Every edge file of a split computes the same thing, ``x -> (is_id, score,
*payload)``; the manifest's ``edge_programs`` says, per file, its runtime,
precision (``float32``, or ``int8`` for a prefix quantized on ID images) and
threshold. :func:`load_edge_program` verifies the file's bytes against the
manifest and hands exactly those bytes to the runtime. Only the PyTorch
runtime imports torch, and only when it is asked for.
"""

import importlib.util
import os

import numpy as np

from ..exceptions import SplitVerificationError
from ._manifest import check_payload, read_manifest, verified_bytes

RUNTIMES = ("executorch", "onnxruntime", "torch")  # the order "auto" prefers them: device runtimes first
PRECISIONS = ("float32", "int8")


def edge_programs(manifest):
    """``{file: {"runtime", "precision", "offset", "batch"}}`` of a split's edge files.

    Splits written before the device formats list none: their ``edge.pt2``
    and ``edge.onnx`` are float programs with the manifest's threshold.
    """
    programs = manifest.get("edge_programs")
    if programs is None:
        programs = {name: {"runtime": runtime, "precision": "float32", "offset": manifest.get("offset"), "batch": None}
                    for runtime, name in (("torch", "edge.pt2"), ("onnxruntime", "edge.onnx"))
                    if name in manifest.get("files", {})}
    if not isinstance(programs, dict) or not all(isinstance(v, dict) for v in programs.values()):
        raise SplitVerificationError("split.json: edge_programs is malformed.")
    for name, info in programs.items():
        if name not in manifest.get("files", {}) or info.get("runtime") not in RUNTIMES:
            raise SplitVerificationError(f"split.json: edge program {name!r} is not a sealed file of a known runtime.")
    return programs


def runtime_available(runtime):
    """Whether this environment can run ``runtime``'s programs (without importing anything heavy)."""
    if runtime == "executorch":
        try:
            from ._executorch import executorch_root

            executorch_root()
            return True
        except ImportError:
            return False
    return importlib.util.find_spec(runtime) is not None


def choose_program(manifest, runtime="auto", precision="auto"):
    """The edge file to run: the requested runtime and precision, or the ``auto`` choice.

    ``runtime="auto"``: ExecuTorch, then ONNX Runtime, then PyTorch, the
    first whose program the split has and this environment can run.
    ``precision="auto"``: the int8 program when the split has one for that
    runtime, else float32.
    """
    if runtime not in ("auto", *RUNTIMES):
        raise ValueError(f"runtime must be 'auto' or one of {RUNTIMES}; got {runtime!r}.")
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}; got {precision!r}.")
    programs = edge_programs(manifest)
    for rt in RUNTIMES if runtime == "auto" else (runtime,):
        names = [n for n, info in programs.items() if info["runtime"] == rt
                 and (precision == "auto" or info.get("precision", "float32") == precision)]
        if not names or (runtime == "auto" and not runtime_available(rt)):
            continue
        names.sort(key=lambda n: programs[n].get("precision", "float32") != "int8")  # int8 first for "auto"
        return names[0]
    have = ", ".join(f"{n} ({i['runtime']}, {i.get('precision', 'float32')})" for n, i in programs.items()) or "none"
    raise ValueError(f"the split has no edge program for runtime={runtime!r}, precision={precision!r} that this "
                     f"environment can run; it has: {have}. Save it with save_split(..., formats=...) or install "
                     "the runtime (onnxruntime, executorch).")


class EdgeProgram:
    """One verified edge file, ready to run: ``program(x) -> (is_id, score, payload)`` on numpy arrays.

    Parameters
    ----------
    name : str
        The file in the split (``edge.pte``, ``edge.int8.onnx``, ...).
    info : dict
        Its entry in the manifest's ``edge_programs``.
    data : bytes
        The file's verified bytes.
    threads : int, default=1
        Intra-op threads of the runtime.

    Examples
    --------
    >>> import tempfile, numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector, save_split
    >>> from earlin_sklearn.edge import load_edge_program
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> X = torch.rand(60, 3, 16, 16)
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_split(*ShallowFeatureOODDetector(net, "1").fit(X).export_split(), folder, X[:2], formats=("onnx",))
    >>> program = load_edge_program(folder)[1]  # an EdgeProgram
    >>> program.name, program.runtime, program.precision, program.batch
    ('edge.onnx', 'onnxruntime', 'float32', None)
    """

    def __init__(self, name, info, data, threads=1):
        self.name, self.runtime = name, info["runtime"]
        self.precision = info.get("precision", "float32")
        self.offset = info.get("offset")
        self.batch = info.get("batch")  # None: any batch size
        self.threads = int(threads)
        if self.runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
            try:  # from bytes: ONNX Runtime then refuses external data (it would read files the manifest does not seal)
                session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime's own Fail/InvalidGraph types
                raise SplitVerificationError(f"{name}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]}); "
                                             "refusing it.") from None
            feed = session.get_inputs()[0].name
            self._run = lambda x: session.run(None, {feed: x})
        elif self.runtime == "executorch":
            from ._executorch import ExecuTorchProgram

            try:
                self._run = ExecuTorchProgram(data, self.threads)
            except ValueError as exc:  # the runtime refused the program (verification, a missing operator)
                raise SplitVerificationError(f"{name}: {exc}; refusing it.") from None
        else:  # PyTorch: the .pt2 after the same code-free check as load_split
            from .._pt2 import load_pt2

            module = load_pt2(name, data)
            import torch

            def run(x):
                with torch.inference_mode():
                    return [t.numpy() for t in module(torch.from_numpy(x))]

            self._run = run

    def __call__(self, x):
        """``(is_id, score, payload)`` for a batch ``x`` (N, C, H, W): bool (N,), float64 (N,), float32 arrays."""
        x = np.ascontiguousarray(x, dtype=np.float32)  # programs keep the memory layout they were exported with
        if self.batch is not None and x.shape[0] != self.batch:
            parts = [self._run(x[i : i + self.batch]) for i in range(0, x.shape[0], self.batch)]
            outs = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
        else:
            outs = self._run(x)
        is_id, score, *payload = outs
        return (np.asarray(is_id, dtype=bool).reshape(-1), np.asarray(score, dtype=np.float64).reshape(-1),
                [np.asarray(p, dtype=np.float32) for p in payload])


def load_edge_program(split_dir: "str | os.PathLike[str]", runtime: str = "auto", precision: str = "auto",
                      key: "bytes | str | None" = None, threads: int = 1,
                      manifest: "dict | None" = None) -> "tuple[dict, EdgeProgram]":
    """The split's edge part in ``runtime``, verified: ``(manifest, program)``.

    Parameters
    ----------
    split_dir : str or Path
        A directory written by ``save_split``.
    runtime : {"auto", "onnxruntime", "executorch", "torch"}, default="auto"
    precision : {"auto", "float32", "int8"}, default="auto"
        See :func:`choose_program`.
    key : bytes or str, default=None
        Require a manifest signed with this key.
    threads : int, default=1
    manifest : dict, default=None
        The already verified manifest (read again when None).

    Returns
    -------
    manifest : dict
    program : EdgeProgram

    Examples
    --------
    >>> import tempfile, numpy as np, torch
    >>> from earlin_sklearn import ShallowFeatureOODDetector, save_split
    >>> from earlin_sklearn.edge import load_edge_program
    >>> from earlin_sklearn.models import cifar_resnet
    >>> X = torch.randn(40, 3, 32, 32)
    >>> det = ShallowFeatureOODDetector(cifar_resnet(20), "layer1", device="cpu").fit(X, np.arange(40) % 2)
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_split(*det.export_split(), folder, X[:2], formats=("onnx",))
    >>> manifest, program = load_edge_program(folder, runtime="onnxruntime")  # verified; no torch needed
    >>> is_id, score, payload = program(X[:3].numpy())
    >>> bool(np.array_equal(is_id, det.predict(X[:3].numpy()) == 1)), payload[0].shape
    (True, (3, 16, 32, 32))
    """
    manifest = read_manifest(split_dir, key) if manifest is None else manifest
    name = choose_program(manifest, runtime, precision)
    info = edge_programs(manifest)[name]
    program = EdgeProgram(name, info, verified_bytes(split_dir, manifest, name), threads=threads)
    try:  # one zero input of the manifest's shape: the program and the manifest must agree on the cut
        outs = program._run(np.zeros((program.batch or 1, *manifest["input_shape"]), np.float32))
    except Exception as exc:
        raise SplitVerificationError(f"{name} does not run on split.json's input_shape "
                                     f"{manifest.get('input_shape')}: {exc}") from None
    check_payload(manifest, [(np.shape(o)[1:], np.asarray(o).dtype.name) for o in outs[2:]], name)
    return manifest, program
