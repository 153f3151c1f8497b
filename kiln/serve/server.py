"""Running the app under uvicorn, with kiln's limits and a draining shutdown.

SIGTERM (or SIGINT) does not stop the server at once: it starts draining. /ready and every
new request answer 503 while requests in flight run to completion, for at most
`shutdown_timeout` seconds; then the server stops, cutting whatever is left (those requests
are aborted and their KV blocks freed). A second signal stops it at once.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from kiln.serve.limits import HeaderLimitH11Protocol
from kiln.serve.state import ServerState

logger = logging.getLogger("kiln.serve")
# After draining, how long uvicorn waits for the last responses to be written.
_FINAL_GRACE_S = 2


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._drain_deadline: float | None = None

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
        if self._drain_deadline is None:
            return False
        if self.state.in_flight == 0:
            logger.info("drained")
            return True
        if time.monotonic() >= self._drain_deadline:
            logger.warning("shutdown timeout: cutting %d sequences", self.state.in_flight)
            return True
        return False


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
                shutdown_timeout: float = 30.0, log_level: str = "info") -> DrainingServer:
    state: ServerState = app.state.kiln
    config = uvicorn.Config(
        app, host=host, port=port, http=HeaderLimitH11Protocol, ws="none", lifespan="on",
        log_level=log_level, h11_max_incomplete_event_size=state.settings.max_header_bytes,
        timeout_graceful_shutdown=_FINAL_GRACE_S, server_header=False,
        # Idle keep-alive connections are closed after this; streams are not idle.
        timeout_keep_alive=30,
    )
    return DrainingServer(config, state, shutdown_timeout)
