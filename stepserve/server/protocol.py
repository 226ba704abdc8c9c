"""uvicorn's h11 protocol with deadlines for slow and stalled clients.

uvicorn bounds only the idle time between keep-alive requests. Two more bounds live here,
per connection, because only the protocol sees them (the app is not called before the headers
are complete, and a full write buffer only shows as flow control):

- headers: from the connection's (or the next request's) first byte until the request line
  and headers are complete, at most ``header_timeout_s``; then a 408 and the connection closed
  (a client trickling headers a byte at a time holds nothing longer than that);
- stalled reader: a response whose write buffer stays full (the client stopped reading; the
  kernel's send buffer is capped, see ``SEND_BUFFER_BYTES``) for ``stall_timeout_s`` has its
  connection aborted. uvicorn then reports a disconnect to the app,
  which cancels the handler; the engine request is aborted and its KV blocks freed, exactly as
  when the client goes away itself.

The body's own deadline (``body_timeout_s``) is applied by the app around reading the body,
where a 408 can be answered in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("stepserve.server")

# The kernel's send buffer per connection. Autotuning lets it grow to 4 MiB, which a token
# stream takes minutes to fill, so a client that stopped reading would never show; at this
# size (the kernel doubles it) a stalled reader shows after about half a megabyte, and a
# stream's throughput is still far beyond what token generation produces.
SEND_BUFFER_BYTES = 256 * 1024


def _timeout_response() -> bytes:
    error = {
        "message": "the request headers took too long to arrive",
        "type": "request_timeout",
        "param": None,
        "code": 408,
    }
    body = json.dumps({"error": error}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol plus a header deadline and a stalled-reader deadline (class attributes)."""

    header_timeout_s: float = 30.0
    stall_timeout_s: float = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # see SEND_BUFFER_BYTES
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._header_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()  # a connection that sends nothing is held no longer either

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request's headers are on their way
        else:
            self._cancel("_header_timer")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel("_header_timer")  # idle between requests: uvicorn's keep-alive timeout rules

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel("_header_timer")
        self._cancel("_stall_timer")
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if getattr(self, "_stall_timer", None) is None:
            self._stall_timer = self.loop.call_later(self.stall_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel("_stall_timer")

    # -- deadlines --------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name, None)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        log.info(
            "closing a connection from %s: no complete request headers within %.1fs", self.client, self.header_timeout_s
        )
        self.transport.write(_timeout_response())
        self.transport.close()

    def _stalled(self) -> None:
        self._stall_timer = None
        if self.transport.is_closing():
            return
        log.warning("aborting a response to %s: the client read nothing for %.1fs", self.client, self.stall_timeout_s)
        self.transport.abort()  # close() would wait for the full buffer to drain, which never happens


def protocol_class(header_timeout_s: float, stall_timeout_s: float) -> type[DeadlineH11Protocol]:
    """The protocol class for uvicorn's ``http=``, with these deadlines."""
    return type(
        "ServerH11Protocol",
        (DeadlineH11Protocol,),
        {"header_timeout_s": header_timeout_s, "stall_timeout_s": stall_timeout_s},
    )
