"""uvicorn's h11 protocol with a timeout on the request head (see embedstream.processes).

uvicorn has no header timeout of its own. A timer runs from the connection
(or, on a kept-alive one, a request's first byte) to the head's last byte;
when it fires the client is answered 408 and the connection half-closed.
The close lingers up to `LINGER_S`, dropping what the client still sends:
closing at once would reset a connection whose client is still writing, and
the reset discards the 408 before the client reads it.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                   b"connection: close\r\n\r\n")
LINGER_S = 2.0


class HeaderTimeoutProtocol(H11Protocol):
    """A timer runs from the connection (or a request's first byte) to its last header."""

    timeout_s = 10.0
    header_timer: asyncio.TimerHandle | None = None
    lingering: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:
            return  # answered 408: what the client still sends is dropped
        if self.header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in (or was refused)
            self._disarm()

    def eof_received(self) -> None:
        if self.lingering is not None:
            self.transport.close()
            return
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.lingering is not None:
            self.lingering.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self.header_timer = self.loop.call_later(self.timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _timed_out(self) -> None:
        """Answer 408 and half-close; close once the client has read it (or `LINGER_S`).

        Closing at once would reset a connection whose client is still
        writing, and a reset discards the 408 before the client reads it.
        """
        self.header_timer = None
        self.transport.write(REQUEST_TIMEOUT)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.lingering = self.loop.call_later(LINGER_S, self.transport.close)

