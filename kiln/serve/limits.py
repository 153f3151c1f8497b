"""Request body limit: bodies → 413, before anything is buffered. (Request heads → 431, and
the connection deadlines, are enforced by the protocol: connection.py.)

Bodies are counted by `BodyLimitMiddleware` as they arrive, declared (Content-Length) or not
(chunked). An oversized body is read on and thrown away (up to a bound) before the 413 is
sent: closing a socket with unread bytes makes the kernel send a reset, and a client still
writing would see "connection reset" instead of the answer.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.serve.errors import error_bytes

# An oversized body is drained for at most this many bytes and seconds, then the connection
# is dropped: the 413 is a courtesy to honest clients, not an obligation to read forever.
MAX_DRAIN_BYTES = 256 * 1024 * 1024
MAX_DRAIN_SECONDS = 10.0


class BodyLimitMiddleware:
    """413 for a request body over `max_body_bytes` (pure ASGI: streams are not buffered)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._reject(receive, send, declared)
            return
        received = 0
        response_started = False
        rejected = False

        async def limited_receive() -> Message:
            # Past the limit, the 413 goes out from here and the app is told the client left:
            # an exception would be turned into a 400 by the framework's body parsing.
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    rejected = True
                    if not response_started:
                        await self._reject(receive, send, received)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if rejected:
                return  # the app's answer to a body it never got whole
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _reject(self, receive: Receive, send: Send, seen: int) -> None:
        if seen <= MAX_DRAIN_BYTES:
            await _drain(receive)
        body = error_bytes(
            413, f"request body too large: limit {self.max_body_bytes} bytes", code="body_too_large"
        )
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(receive: Receive) -> None:
    drained = 0
    deadline = time.monotonic() + MAX_DRAIN_SECONDS
    while drained <= MAX_DRAIN_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), timeout=remaining)
        except asyncio.TimeoutError:
            return  # a client that stopped sending does not hold the connection longer
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
