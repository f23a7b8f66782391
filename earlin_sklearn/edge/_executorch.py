"""ExecuTorch programs (``.pte``) run without PyTorch.

The ``executorch`` wheel ships its C++ runtime as plain shared libraries
(``executorch/lib``: the core runtime, the XNNPACK delegate, the optimized and
quantized kernels) and their headers, but its Python bindings link libtorch.
This module compiles a 100-line C shim (``_executorch_runner.cpp``) against
those libraries once, caches it per user, and calls it through ctypes: the
same calls an Android or iOS app makes through ExecuTorch's Java or Swift
API, with numpy on this side. Building needs a C++17 compiler (``$CXX`` or
``c++``) the first time; ``pip install --no-deps executorch`` is enough at
run time.
"""

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("_executorch_runner.cpp")
LIBRARIES = ("executorch", "executorch_backend_xnnpack", "executorch_kernels_optimized", "executorch_kernels_quantized",
             "executorch_threadpool")
# ExecuTorch's ScalarType codes of the outputs an edge program returns
_DTYPES = {1: np.int8, 4: np.int64, 6: np.float32, 7: np.float64, 11: np.bool_, 0: np.uint8, 3: np.int32}
_lock = threading.Lock()
_library = None


def executorch_root():
    """The installed ``executorch`` package's folder, found without importing it (its ``__init__`` imports torch)."""
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("running a .pte program needs the ExecuTorch runtime libraries: pip install executorch "
                          "(on a device without PyTorch: pip install --no-deps executorch)")
    root = Path(list(spec.submodule_search_locations)[0])
    missing = [name for name in LIBRARIES if not (root / "lib" / f"lib{name}.so").is_file()]
    if missing or not (root / "include" / "executorch").is_dir():
        raise ImportError(f"the executorch package at {root} lacks its runtime libraries or headers "
                          f"({', '.join('lib' + m + '.so' for m in missing) or 'include/'}); reinstall executorch.")
    return root


def _cache_dir():
    base = os.environ.get("EARLIN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "earlin_sklearn")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return Path(base)


def _owned_and_private(path):
    st = os.lstat(path)
    return st.st_uid == os.getuid() and not (st.st_mode & 0o022) and not os.path.islink(path)


def build_command(root, output):
    """The compiler command that builds the shim against the wheel's libraries (as its CMake config says)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise ImportError("running a .pte program without PyTorch compiles a small C++ shim once: install a C++ "
                          "compiler (e.g. apt install g++) or set $CXX.")
    lib = root / "lib"
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
            "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED",
            f"-I{root / 'include'}", f"-I{root / 'include/executorch/runtime/core/portable_type/c10'}",
            str(SOURCE), f"-L{lib}", "-Wl,--no-as-needed", *[f"-l{name}" for name in LIBRARIES],
            f"-Wl,-rpath,{lib}", "-o", str(output)]


def runtime_library():
    """The shim as a ctypes library, compiled on first use into the user's cache (``$EARLIN_CACHE_DIR``)."""
    global _library
    with _lock:
        if _library is not None:
            return _library
        root = executorch_root()
        digest = hashlib.sha256(SOURCE.read_bytes())
        for name in LIBRARIES:  # a new executorch release gets a new build
            st = (root / "lib" / f"lib{name}.so").stat()
            digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        path = _cache_dir() / f"libearlin_executorch-{digest.hexdigest()[:16]}.so"
        if not (path.is_file() and _owned_and_private(path)):
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so", delete=False) as tmp:
                pass
            try:
                done = subprocess.run(build_command(root, tmp.name), capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    raise ImportError(f"compiling the ExecuTorch shim failed:\n{done.stderr[-2000:]}")
                os.chmod(tmp.name, 0o700)
                os.replace(tmp.name, path)
            finally:
                if os.path.exists(tmp.name):
                    os.unlink(tmp.name)
        lib = ctypes.CDLL(str(path))
        lib.earlin_et_load.restype = ctypes.c_void_p
        lib.earlin_et_load.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        lib.earlin_et_run.restype = ctypes.c_int
        lib.earlin_et_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int,
                                      ctypes.c_char_p, ctypes.c_size_t]
        lib.earlin_et_output.restype = ctypes.c_int
        lib.earlin_et_output.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                         ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int64),
                                         ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
        lib.earlin_et_free.restype = None
        lib.earlin_et_free.argtypes = [ctypes.c_void_p]
        _library = lib
        return lib


class ExecuTorchProgram:
    """A loaded ``.pte`` program's ``forward``: float32 input in, numpy outputs out.

    Parameters
    ----------
    data : bytes
        The program (already verified by the caller).
    threads : int, default=1
        1: XNNPACK runs on the calling thread; more: ExecuTorch's thread pool.
    """

    def __init__(self, data, threads=1):
        self._lib = runtime_library()
        self._err = ctypes.create_string_buffer(1024)
        self._handle = self._lib.earlin_et_load(data, len(data), int(threads), self._err, len(self._err))
        if not self._handle:
            raise ValueError(f"ExecuTorch could not load the program: {self._err.value.decode(errors='replace')}")
        self._run_lock = threading.Lock()  # one Module runs one call at a time

    def __call__(self, x):
        """Outputs of ``forward(x)`` for one C-contiguous float32 array, as numpy copies."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        sizes = (ctypes.c_int64 * x.ndim)(*x.shape)
        with self._run_lock:
            n = self._lib.earlin_et_run(self._handle, x.ctypes.data, sizes, x.ndim, self._err, len(self._err))
            if n < 0:
                raise ValueError(f"ExecuTorch: {self._err.value.decode(errors='replace')} (got {x.shape})")
            outputs = []
            for i in range(n):
                dtype, ndim, shape = ctypes.c_int(), ctypes.c_int(), (ctypes.c_int64 * 8)()
                data, nbytes = ctypes.c_void_p(), ctypes.c_size_t()
                if self._lib.earlin_et_output(self._handle, i, dtype, ndim, shape, data, nbytes) != 0:
                    raise ValueError(f"ExecuTorch: output {i} is not a tensor.")
                if dtype.value not in _DTYPES:
                    raise ValueError(f"ExecuTorch: output {i} has scalar type {dtype.value}, which this runner "
                                     "does not read.")
                buffer = (ctypes.c_char * nbytes.value).from_address(data.value) if nbytes.value else b""
                array = np.frombuffer(bytes(buffer), dtype=_DTYPES[dtype.value])
                outputs.append(array.reshape([shape[d] for d in range(ndim.value)]))
        return outputs

    def close(self):
        if getattr(self, "_handle", None):
            self._lib.earlin_et_free(self._handle)
            self._handle = None

    def __del__(self):
        self.close()
