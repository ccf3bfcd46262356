"""uvicorn's httptools protocol with a request-header timeout.

uvicorn times out an idle keep-alive connection only after a response: a client that connects and
sends nothing, or sends part of its headers, holds the connection (and a file descriptor) forever.
Here the headers of each request must be complete within `header_timeout_s` of the connection
opening or of the request's first byte; otherwise the server answers 408 and closes. The body has
its own timeouts (service/middleware.py, BodyLimitMiddleware).

`reid serve` runs uvicorn with `http="service.protocol:HeaderTimeoutProtocol"`; the timeout is the
`header_timeout_s` setting of the server's settings (WILDREID_SERVICE_SETTINGS).
"""
from __future__ import annotations

import os
from asyncio import TimerHandle
from functools import lru_cache

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_HEADER_TIMEOUT_S = 10.0
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s")


@lru_cache(maxsize=1)
def configured_header_timeout() -> float:
    from service.settings import ENV_VAR, Settings

    return Settings.from_env().header_timeout_s if os.environ.get(ENV_VAR) else DEFAULT_HEADER_TIMEOUT_S


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout_s: float | None = None  # None: the configured one

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timer: TimerHandle | None = None
        self._timeout = self.header_timeout_s or configured_header_timeout()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self._timeout, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # waiting for headers, not answering
            body = (b'{"error": {"code": "request_timeout", "message": "the request headers did not arrive within '
                    b'%g s"}}' % self._timeout)
            self.transport.write(TIMEOUT_RESPONSE % (len(body), body))
            self.transport.close()
