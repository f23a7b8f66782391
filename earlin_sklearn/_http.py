"""uvicorn's HTTP protocols with a deadline for request headers (uvicorn has none: slow-loris clients).

A connection that has not sent a request's complete headers ``seconds``
after it opened, or after its previous response, is closed. The deadline is
one mixin over uvicorn's two HTTP/1.1 protocols: httptools' (a C parser, in
``earlin_sklearn[serve]``; used when installed, it costs less CPU per
request: side by side, ``GET /livez`` served 1.3-1.4x h11's requests/s) and h11's
(pure Python, uvicorn's fallback). A module of its own, so that uvicorn's
worker processes (``earlin serve-cloud --workers``) import the class by
name; there the deadline comes from ``$EARLIN_HEADER_TIMEOUT``, which the
supervisor sets.
"""

import importlib.util
import logging
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

from ._constants import HEADER_TIMEOUT_ENV

logger = logging.getLogger("earlin_sklearn._server")


class HeaderTimeout:
    """The deadline, over a uvicorn protocol that sets ``self.cycle`` once a request's headers are parsed."""

    seconds = float(os.environ.get(HEADER_TIMEOUT_ENV, "10"))

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def _arm(self):
        self._disarm()
        self._header_timer = self.loop.call_later(self.seconds, self._expire)

    def _disarm(self):
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        self._header_timer = None

    def _expire(self):
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request under way: headers too slow
            logger.info("closing a connection that sent no complete request headers in %s s", self.seconds)
            self.transport.close()

    def data_received(self, data):
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # headers complete: the body has its own deadline (body_timeout)

    def on_response_complete(self):
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)


class HeaderTimeoutH11(HeaderTimeout, H11Protocol):
    pass


# the protocol the server runs: httptools' where it is installed, else h11's
if importlib.util.find_spec("httptools") is not None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutHttpTools(HeaderTimeout, HttpToolsProtocol):
        pass

    DEFAULT = "HeaderTimeoutHttpTools"
else:
    DEFAULT = "HeaderTimeoutH11"


def protocol(name=None):
    """The class of the protocol ``name`` (a class of this module; None: :data:`DEFAULT`)."""
    return globals()[name or DEFAULT]
