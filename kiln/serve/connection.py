"""Connection limits that hold before authentication: uvicorn's h11 protocol with a cap on
open connections, deadlines for reading a request head and body, and an exact head size.

    connection accepted ──► over max_connections?  → 503, closed at once
    first byte / keep-alive ──► head complete within header_timeout_s?   else 408, closed
    head larger than max_header_bytes (counted exactly, up to the blank line)? → 431, closed
    head complete ──► body complete within body_timeout_s?   else 408, closed
    response sent ──► next request's first byte within keep_alive_timeout_s? else closed

These run in the protocol, below the ASGI app, so a client that never authenticates (it
never finishes a request) is closed like any other. A request whose body has arrived holds
its connection for as long as its answer takes: a stream is not idle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from kiln.serve.errors import error_bytes

logger = logging.getLogger("kiln.serve")
# The blank line that ends a request head (h11 also takes a bare "\n\n").
_HEAD_END = re.compile(rb"\n\r?\n")
# Connections the event loop accepts in one go (and the kernel's listen queue): asyncio
# accepts up to this many before any of them reaches the protocol, which then closes those
# over the cap, and a connection reaches the protocol two loop turns after its accept. So
# for a moment the open files can reach max_connections + _ACCEPT_BURSTS × ACCEPT_BACKLOG.
ACCEPT_BACKLOG = 64
_ACCEPT_BURSTS = 3
# Files kept free besides the ones open now and the accept burst: the engine's files while it
# loads, the log, a worker thread's.
_SPARE_FDS = 32


def default_max_connections(wanted: int = 1024) -> int:
    """`wanted`, lowered so that the connections, one accept burst and the files open now
    fit under the process's open-file limit (ulimit -n): past the cap a client gets a 503,
    and `accept` never fails with EMFILE (which would stall every new client)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        in_use = 64
    return max(1, min(wanted, soft - in_use - _ACCEPT_BURSTS * ACCEPT_BACKLOG - _SPARE_FDS))


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    """Per-connection limits; every one has a default an honest client never meets."""

    # Request line + headers, up to and including the blank line, in bytes.
    max_header_bytes: int = 64 * 1024
    # From a connection's first byte (or its accept) to the end of the request head.
    header_timeout_s: float = 10.0
    # From the end of the head to the end of the body (8 MiB at 300 KB/s).
    body_timeout_s: float = 30.0
    # Between a response's end and the next request's first byte.
    keep_alive_timeout_s: float = 5.0
    # Open connections; past it a new one is answered 503 and closed (the CLI's default is
    # default_max_connections(): 1024, lowered to fit ulimit -n).
    max_connections: int = 1024

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        for name in ("max_header_bytes", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


def _close_with(transport: asyncio.Transport, status: int, reason: bytes, message: str) -> None:
    body = error_bytes(status, message)
    transport.write(
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason, len(body)) + body
    )
    transport.close()


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with `ConnectionLimits` (set by `limited_protocol`)."""

    limits = ConnectionLimits()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._error_status = 400
        self._head_bytes = 0  # bytes of the current request head seen so far
        self._head_tail = b""  # the last bytes of it, for a blank line split across reads
        self._deadline: asyncio.TimerHandle | None = None
        next_event = self.conn.next_event

        def next_event_remembering_status():
            try:
                return next_event()
            except h11.RemoteProtocolError as error:
                self._error_status = error.error_status_hint
                raise

        self.conn.next_event = next_event_remembering_status

    # ---- the connection cap and the deadlines ----

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            logger.warning("refused a connection: %d open, limit %d",
                           len(self.connections) - 1, self.limits.max_connections)
            _close_with(transport, 503, b"Service Unavailable",
                        "too many open connections; retry later")
            return
        self._arm(self.limits.header_timeout_s, "request head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._on_deadline, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self, what: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            _close_with(self.transport, 408, b"Request Timeout",
                        f"the {what} did not arrive in time")
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        waiting_for_head = self.conn.their_state is h11.IDLE
        if waiting_for_head:
            if self._deadline is None:  # the first byte after a keep-alive wait
                self._arm(self.limits.header_timeout_s, "request head")
            if self._head_too_large(data):
                self._error_status = 431
                self.send_400_response("request headers too large")
                return
        super().data_received(data)
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if waiting_for_head and state is not h11.IDLE:  # the head is complete
            self._head_bytes, self._head_tail = 0, b""
        if state is h11.SEND_BODY:
            # The body's deadline runs from the end of the head, and is armed again if an early
            # answer (a 401 or 413 before the body was read) disarmed it: a body trickling in
            # after its answer does not hold the connection either.
            if waiting_for_head or self._deadline is None:
                self._arm(self.limits.body_timeout_s, "request body")
        elif state is not h11.IDLE:
            self._disarm()  # the request is complete: the answer may take as long as it takes

    def on_response_complete(self) -> None:
        self._disarm()  # uvicorn arms its keep-alive timer; the next byte re-arms the head's
        super().on_response_complete()

    def _head_too_large(self, data: bytes) -> bool:
        """Count the head's bytes exactly, up to and including its blank line."""
        window = self._head_tail + data
        end = _HEAD_END.search(window)
        if end is not None:
            size = self._head_bytes + end.end() - len(self._head_tail)
        else:
            size = self._head_bytes + len(data)
            self._head_bytes = size
            self._head_tail = window[-2:]
        return size > self.limits.max_header_bytes

    # ---- 431 instead of uvicorn's 400 ----

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        if self._error_status != 431:
            super().send_400_response(msg)
            return
        # Written directly: h11 may not have seen the head (counted before it is parsed).
        _close_with(self.transport, 431, b"Request Header Fields Too Large",
                    f"request headers too large: limit {self.limits.max_header_bytes} bytes")


def limited_protocol(limits: ConnectionLimits) -> type[LimitedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, carrying these limits."""
    return type("KilnH11Protocol", (LimitedH11Protocol,), {"limits": limits})
