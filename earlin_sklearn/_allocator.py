"""The C allocator, where it is glibc: handing freed heap memory back to the system.

glibc keeps memory freed by large, short-lived buffers (request bodies,
batched activations) in its heaps and arenas, so a server's resident memory
stays at its peak long after the load has gone. ``malloc_trim(0)`` returns
the free pages of every arena to the system. On other C libraries nothing
is done.
"""

import contextlib
import ctypes
import platform


def glibc():
    """The glibc C library (ctypes), or None on another C library."""
    if platform.libc_ver()[0] != "glibc":
        return None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6")
        if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
            return libc
    return None


class IdleTrimmer:
    """Call ``malloc_trim(0)`` once no large request has finished for ``delay`` seconds.

    ``note(loop)`` after each large request (re)arms the timer on the event
    loop; the trim runs in a worker thread, off the loop.
    """

    def __init__(self, delay=1.0):
        self.delay, self.libc, self.handle, self.trims = float(delay), glibc(), None, 0

    def note(self, loop):
        if self.libc is None:
            return
        if self.handle is not None:
            self.handle.cancel()
        self.handle = loop.call_later(self.delay, lambda: loop.run_in_executor(None, self._trim))

    def _trim(self):
        self.libc.malloc_trim(0)
        self.trims += 1
