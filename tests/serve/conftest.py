"""Server test fixtures: the real SmolLM2 engine, built once per session into a temporary
KILN_CACHE_DIR and loaded once; servers on 127.0.0.1 ephemeral ports, in a thread of the
test process, so tests can look inside the engine (running requests, free KV blocks).

One LLMEngine serves every server of the session, one server at a time (the `serving`
context manager refuses a second): the main `server` fixture is module-scoped, so modules
that need servers with other settings start their own after it has stopped.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import httpx
import pytest

from kiln.config import EngineConfig
from kiln.compiler.engine_cache import resolve_engine
from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.engine import LLMEngine
from kiln.serve.app import create_app
from kiln.serve.connection import ConnectionLimits
from kiln.serve.server import DrainingServer, make_server
from kiln.serve.state import ServerState, ServeSettings

API_KEY = "test-key-0123456789"
MODEL = "smollm2-test"
# Small enough to keep the suite fast on 2 cores, big enough for 64 concurrent streams.
ENGINE_CONFIG = dict(device="cpu", num_kv_blocks=384, block_size=16, max_model_len=1024,
                     max_num_seqs=64, max_num_batched_tokens=2048)


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_CACHE_DIR", str(tmp_path_factory.mktemp("kiln-cache")))
        return resolve_engine("smollm2")


@pytest.fixture(scope="session")
def llm_engine(engine_dir) -> LLMEngine:
    return LLMEngine.from_engine_dir(engine_dir, EngineConfig(**ENGINE_CONFIG))


@dataclass
class Server:
    url: str
    server: DrainingServer
    thread: threading.Thread
    engine: LLMEngine
    api_key: str | None

    @property
    def state(self) -> ServerState:
        return self.server.config.app.state.kiln

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kwargs)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until the engine has no request left (aborts are applied between steps)."""
        deadline = time.monotonic() + timeout
        scheduler = self.engine.scheduler
        while scheduler.num_running or scheduler.num_waiting or self.state.in_flight:
            assert time.monotonic() < deadline, (
                f"engine not idle: running {scheduler.num_running}, waiting "
                f"{scheduler.num_waiting}, in flight {self.state.in_flight}")
            time.sleep(0.02)


_serving_lock = threading.Lock()


def free_port() -> int:
    """An ephemeral loopback port for uvicorn to bind. (Handing uvicorn a bound socket
    instead costs every request ~40 ms here: its accepted connections then wait on
    delayed ACKs.)"""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(engine: LLMEngine | None, api_key: str | None = API_KEY,
            settings: ServeSettings | None = None, engine_loader=None,
            shutdown_timeout: float = 10.0, limits: ConnectionLimits | None = None,
            model_name: str = MODEL) -> Iterator[Server]:
    if not _serving_lock.acquire(blocking=False):
        raise RuntimeError("one server at a time: they share one LLMEngine")
    try:
        async_engine = AsyncLLMEngine(engine) if engine is not None else None
        app = create_app(async_engine, model_name, api_key=api_key, settings=settings,
                         engine_loader=engine_loader)
        port = free_port()
        server = make_server(app, port=port, shutdown_timeout=shutdown_timeout, log_level="warning",
                             limits=limits)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        handle = Server(f"http://127.0.0.1:{port}", server, thread, engine, api_key)
        try:
            yield handle
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            assert not thread.is_alive(), "server thread did not stop"
    finally:
        _serving_lock.release()


@pytest.fixture(scope="module")
def server(llm_engine) -> Iterator[Server]:
    with serving(llm_engine) as handle:
        yield handle
