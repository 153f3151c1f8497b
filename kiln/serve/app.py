"""The FastAPI app: `create_app(async_engine, model_name, api_key=None, ...)`.

    request ─► uvicorn (h11: head limit → 431) ─► APIKeyMiddleware (401) ─► BodyLimitMiddleware
            (413) ─► FastAPI routes (validation → 400) ─► AsyncLLMEngine

The engine may be given loaded, or as `engine_loader`, which runs in a worker thread after
the server starts listening, so /health answers at once and /ready says 503 until the model
is loaded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
import time
from importlib import resources
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from kiln.errors import KilnError
from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.engine import LLMEngine
from kiln.serve.auth import APIKeyMiddleware
from kiln.serve.errors import error_body, install_error_handlers
from kiln.serve.limits import BodyLimitMiddleware
from kiln.serve.metrics import CONTENT_TYPE
from kiln.serve.openai_api import router, server_state
from kiln.serve.state import ServerState, ServeSettings

logger = logging.getLogger("kiln.serve")
# How long shutdown waits for aborted requests to leave the engine before stopping its loop.
_ABORT_WAIT_S = 10.0


def _page() -> tuple[str, str]:
    """The web chat page and a Content-Security-Policy that allows exactly its own inline
    script and style (by hash) and requests to this server only."""
    html = resources.files("kiln.serve").joinpath("ui/index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks
        )

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    return html, policy


async def _load(state: ServerState, loader: Callable[[], LLMEngine]) -> None:
    started = time.monotonic()
    try:
        engine = await asyncio.to_thread(loader)
    except (KilnError, ValueError) as error:  # bad input: its one line says it all
        state.load_error = str(error)
        logger.error("loading the model failed: %s", error)
        return
    except Exception as error:  # a kiln bug: the traceback is for whoever fixes it
        state.load_error = f"{type(error).__name__}: {error}"
        logger.exception("loading the model failed")
        return
    state.async_engine = AsyncLLMEngine(engine)
    logger.info("model %s loaded in %.1f s", state.model_name, time.monotonic() - started)


async def shutdown_engine(state: ServerState) -> None:
    """Abort what is left, wait for the engine to go idle, then stop its loop: the loop is
    only cancelled between steps, so the engine is left clean for whoever uses it next."""
    async_engine = state.async_engine
    if async_engine is None:
        return
    for request_id in list(state.active_request_ids):
        if async_engine.is_running:
            async_engine.abort(request_id)
        else:
            async_engine.llm_engine.abort_request(request_id)
    deadline = time.monotonic() + _ABORT_WAIT_S
    while async_engine.is_running and async_engine.llm_engine.has_unfinished_requests() \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await async_engine.shutdown()


def create_app(
    async_engine: AsyncLLMEngine | None,
    model_name: str,
    api_key: str | None = None,
    settings: ServeSettings | None = None,
    engine_loader: Callable[[], LLMEngine] | None = None,
) -> FastAPI:
    if async_engine is None and engine_loader is None:
        raise ValueError("give async_engine or engine_loader")
    settings = settings or ServeSettings()
    state = ServerState(model_name, settings, async_engine)
    page, page_policy = _page()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        loading = None
        if state.async_engine is None:
            loading = asyncio.create_task(_load(state, engine_loader))
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
            await shutdown_engine(state)
            state.tokenizer_pool.shutdown()

    # No /docs or /redoc: their pages load scripts from a CDN. The schema stays.
    app = FastAPI(title="kiln", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kiln = state
    install_error_handlers(app)
    app.include_router(router)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        # Liveness: is restarting the process the fix? Only when loading failed or the engine
        # loop died. Unauthenticated, so it says no more than that.
        state = server_state(request)
        dead = state.load_error is not None or (
            state.async_engine is not None and state.async_engine.error is not None)
        return JSONResponse({"status": "dead" if dead else "ok"}, status_code=503 if dead else 200)

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        state = server_state(request)
        reason = state.not_ready_reason()
        if reason is not None:
            return JSONResponse(error_body(503, reason, code="not_ready"), status_code=503,
                                headers={"Retry-After": str(state.settings.retry_after_s)})
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def web_chat() -> HTMLResponse:
        return HTMLResponse(page, headers={
            "Content-Security-Policy": page_policy, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
        })

    # Added last = outermost: the key is checked before a body byte is read.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app
