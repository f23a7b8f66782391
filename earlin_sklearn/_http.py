"""uvicorn's h11 protocol with a deadline for request headers (uvicorn has none: slow-loris clients).

A connection that has not sent a request's complete headers ``seconds``
after it opened, or after its previous response, is closed. A module of its
own, so that uvicorn's worker processes (``earlin serve-cloud --workers``)
import the class by name; there the deadline comes from
``$EARLIN_HEADER_TIMEOUT``, which the supervisor sets.
"""

import logging
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

from ._constants import HEADER_TIMEOUT_ENV

logger = logging.getLogger("earlin_sklearn._server")


class HeaderTimeoutH11(H11Protocol):
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
