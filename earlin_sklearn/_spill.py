"""Pooled features kept on disk between two passes of a fit, so the backbone runs once per image."""

import os
import tempfile

import numpy as np


class FeatureSpill:
    """Feature batches written to a file as they come and read back in the same batches.

    8 bytes per feature and image on disk; one batch in memory. Labels are
    kept in memory (one per image). ``path=None`` uses an anonymous
    temporary file, deleted when closed; with a path, the file stays until
    :meth:`close` (a Dask worker's second pass reads it in another task).
    """

    def __init__(self, path=None):
        self.path = path
        self.file = tempfile.TemporaryFile() if path is None else open(path, "w+b")
        self.batches_kept = []

    def write(self, F, y):
        F = np.ascontiguousarray(F, dtype=np.float64)
        self.file.write(F.tobytes())
        self.batches_kept.append((F.shape, y))

    def batches(self):
        self.file.flush()
        self.file.seek(0)
        for shape, y in self.batches_kept:
            yield np.frombuffer(self.file.read(8 * shape[0] * shape[1]), dtype=np.float64).reshape(shape), y

    def close(self):
        self.file.close()
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)
