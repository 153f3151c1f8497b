"""Server-sent events and client-disconnect handling.

A client that goes away must stop costing engine steps at once, wherever its request is:
queued, in prefill or decoding. Both response paths therefore watch the connection for
`http.disconnect` while they wait for the engine, and cancel the work when it comes; the
cancellation reaches `AsyncLLMEngine.generate`, which aborts the request, and the engine
frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("kiln.serve")
T = TypeVar("T")
DONE_EVENT = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    # ensure_ascii keeps every event one line whatever the text holds (no raw newlines).
    return f"data: {json.dumps(payload, ensure_ascii=True, separators=(',', ':'))}\n\n"


class ClientDisconnected(Exception):
    """The client went away mid-stream."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client leaves."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.create_task(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Reached also when this handler itself is cancelled (server shutdown).
        for task in (work_task, watch_task):
            if not task.done():
                task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)
    if work_task.done() and not work_task.cancelled():
        return work_task.result()  # its result, or its exception
    raise ClientDisconnected()


class SSEResponse(StreamingResponse):
    """200 text/event-stream from an async iterator of ready-made event strings.

    Unlike Starlette's, it always watches for disconnect (whatever the ASGI spec version),
    closes the iterator deterministically, and calls `on_close` exactly once however the
    stream ends, so the admission it holds is given back.
    """

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
        })
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            stream_task = asyncio.create_task(self._stream(send))
            watch_task = asyncio.create_task(_wait_for_disconnect(receive))
            try:
                await asyncio.wait({stream_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (stream_task, watch_task):
                    task.cancel()
                await asyncio.gather(stream_task, watch_task, return_exceptions=True)
        finally:
            try:
                await self._events.aclose()
            finally:
                self._on_close()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        try:
            async for event in self._events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        except OSError:
            return  # the client went away while we wrote; the watcher sees the disconnect
        await send({"type": "http.response.body", "body": b"", "more_body": False})
