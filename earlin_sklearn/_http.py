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
    """The deadline, over a uvicorn protocol that sets ``self.cycle`` once a request's headers are parsed.

    One timer per connection, not one per request: a response's completion
    only notes the time (the hot path of a keep-alive connection creates and
    cancels no timer handle), and the timer, when it fires, closes the
    connection if it is still waiting for headers past the deadline, or sets
    itself again for the time left.
    """

    seconds = float(os.environ.get(HEADER_TIMEOUT_ENV, "10"))

    def connection_made(self, transport):
        super().connection_made(transport)
        self._header_timer = None
        self._arm()

    def _arm(self):
        """Start the wait for the next request's headers now."""
        self._waiting_since = self.loop.time()
        if self._header_timer is None:
            self._header_timer = self.loop.call_at(self._waiting_since + self.seconds, self._expire)

    def _expire(self):
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is under way (the body has its own deadline); its response re-arms
        left = self._waiting_since + self.seconds - self.loop.time()
        if left > 0:  # a later request completed since the timer was set: wait the time left
            self._header_timer = self.loop.call_later(left, self._expire)
            return
        logger.info("closing a connection that sent no complete request headers in %s s", self.seconds)
        self.transport.close()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc):
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
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
