"""Running the app under uvicorn, with kiln's limits and a draining shutdown.

SIGTERM (or SIGINT) does not stop the server at once: it starts draining. /ready and every
new request answer 503 while requests in flight run to completion, for at most
`shutdown_timeout` seconds; then the server stops, cutting whatever is left (those requests
are aborted and their KV blocks freed). A second signal stops it at once.

A stream cut that way still ends as an OpenAI stream does: an error event, then [DONE]
(`ServerState.cut_streams`); a non-streaming request gets a 503. Only then does uvicorn stop,
so no handler is cancelled mid-write.

When the model fails to load, the server stops too (and `kiln serve` exits non-zero with the
one-line error), unless it was asked to stay up answering /health 503.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from kiln.serve.connection import ACCEPT_BACKLOG, ConnectionLimits, limited_protocol
from kiln.serve.state import ServerState

logger = logging.getLogger("kiln.serve")
# After draining, how long uvicorn waits for the last responses to be written.
_FINAL_GRACE_S = 2


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float,
                 exit_on_load_error: bool = False) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.exit_on_load_error = exit_on_load_error
        self._drain_deadline: float | None = None
        self._cut_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_deadline is not None or self.shutdown_timeout <= 0:
            super().handle_exit(sig, frame)  # the second signal: stop now
            if self._drain_deadline is not None:
                self.force_exit = True
            return
        self.begin_drain()

    def begin_drain(self) -> None:
        """Stop taking requests; stop the server once in-flight ones finish or time runs out."""
        if self._drain_deadline is None:
            logger.info("draining: %d sequences in flight, up to %.0f s",
                        self.state.in_flight, self.shutdown_timeout)
            self.state.draining = True
            self._drain_deadline = time.monotonic() + self.shutdown_timeout

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.exit_on_load_error and self.state.load_error is not None:
            return True
        if self._drain_deadline is None:
            return False
        if self.state.in_flight == 0:
            if self._cut_deadline is None:
                logger.info("drained")
            return True
        now = time.monotonic()
        if self._cut_deadline is None and now >= self._drain_deadline:
            cut = self.state.cut_streams("the server shut down before this request finished")
            logger.warning("shutdown timeout: cut %d requests (%d sequences); each got an error "
                           "and the end of its stream", cut, self.state.in_flight)
            self._cut_deadline = now + _FINAL_GRACE_S
        return self._cut_deadline is not None and now >= self._cut_deadline


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
                shutdown_timeout: float = 30.0, log_level: str = "info",
                limits: ConnectionLimits | None = None,
                exit_on_load_error: bool = False) -> DrainingServer:
    state: ServerState = app.state.kiln
    limits = limits or ConnectionLimits(max_header_bytes=state.settings.max_header_bytes)
    config = uvicorn.Config(
        app, host=host, port=port, http=limited_protocol(limits), ws="none", lifespan="on",
        log_level=log_level, timeout_graceful_shutdown=_FINAL_GRACE_S, server_header=False,
        # The protocol counts the head exactly; h11's own bound is only a backstop.
        h11_max_incomplete_event_size=limits.max_header_bytes + 4,
        # Idle keep-alive connections are closed after this; streams are not idle.
        timeout_keep_alive=limits.keep_alive_timeout_s,
        # Bounds each accept burst, so max_connections holds before the open-file limit does.
        backlog=ACCEPT_BACKLOG,
    )
    return DrainingServer(config, state, shutdown_timeout, exit_on_load_error)
