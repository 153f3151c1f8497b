"""What one server knows besides its routes: settings, the engine (once loaded), readiness,
and the admission count that bounds the queue."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import MAX_N
from kiln.serve.errors import APIError
from kiln.serve.metrics import ServerMetrics
from kiln.serve.tokenization import PENDING_PROMPTS_OF_WORK, TokenizerPool, max_prompt_chars_for


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """Limits and policies of one server; every field has a secure default."""

    # Largest request body (bytes) and request head (request line + headers, bytes).
    max_body_bytes: int = 8 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    # Sequences (prompts x n) admitted and not finished; past it, new requests get 503.
    max_queued_requests: int = 256
    # Seconds a client is told to wait (Retry-After) after a 503.
    retry_after_s: int = 1
    # Server caps, within the schema's hard limits.
    max_n: int = 16
    max_tokens_cap: int | None = None  # None: up to the model length
    max_prompts: int = 64  # prompts in one batched /v1/completions request
    # Chat template budget: wall time per render and characters of output.
    chat_template_timeout_s: float = 1.0
    chat_template_max_chars: int = 1 << 20
    # Longest prompt text (characters), checked before the tokenizer sees it; None: derived
    # from the model (tokenization.max_prompt_chars_for).
    max_prompt_chars: int | None = None
    # Characters waiting for or in the tokenizer; past it, new requests get 503. None:
    # tokenization.PENDING_PROMPTS_OF_WORK whole-context prompts.
    max_pending_tokenizer_chars: int | None = None
    # A template sent in the request runs code the operator did not choose: off by default.
    trust_request_chat_template: bool = False
    # The tool-call format of the model's output (tool_parsers.USER_PARSERS); None: chosen
    # from the chat template's text.
    tool_call_parser: str | None = None
    # /ready fails when requests are in flight but no engine step has produced output for
    # this long (a stuck step).
    stall_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        positive = ("max_body_bytes", "max_header_bytes", "max_queued_requests", "max_n",
                    "max_prompts", "chat_template_max_chars")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_n > MAX_N:
            raise ValueError(f"max_n must be <= {MAX_N}, got {self.max_n}")
        for name in ("max_prompt_chars", "max_pending_tokenizer_chars"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.tool_call_parser is not None:
            from kiln.serve.tool_parsers import USER_PARSERS

            if self.tool_call_parser not in USER_PARSERS:
                raise ValueError(f"tool_call_parser must be one of {', '.join(USER_PARSERS)}, "
                                 f"got {self.tool_call_parser!r}")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be >= 1, got {self.max_tokens_cap}")
        for name in ("chat_template_timeout_s", "stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


class ServerState:
    def __init__(self, model_name: str, settings: ServeSettings,
                 async_engine: AsyncLLMEngine | None = None) -> None:
        self.model_name = model_name
        self.settings = settings
        self.async_engine = async_engine
        self.created = int(time.time())
        self.load_error: str | None = None
        self.draining = False
        # Sequences admitted and not yet finished or aborted.
        self.in_flight = 0
        # Engine request ids submitted and not yet finished (aborted at shutdown).
        self.active_request_ids: set[str] = set()
        self.last_progress = time.monotonic()
        # The queues stream_outputs reads, one per request in flight: shutdown puts an error
        # in each to end its stream cleanly (cut_streams).
        self.output_queues: set[asyncio.Queue] = set()
        self.tokenizer_pool = TokenizerPool(settings.max_pending_tokenizer_chars)
        self._max_prompt_chars: int | None = settings.max_prompt_chars
        self.metrics = ServerMetrics(model_name, lambda: self.engine.scheduler if self.async_engine else None)

    @property
    def engine(self) -> LLMEngine:
        if self.async_engine is None:
            raise APIError(503, "the model is still loading", headers=self._retry_after())
        return self.async_engine.llm_engine

    def max_prompt_chars(self) -> int:
        """The longest prompt text this server tokenizes (derived once from the model)."""
        if self._max_prompt_chars is None:
            engine = self.engine
            self._max_prompt_chars = max_prompt_chars_for(engine.tokenizer, engine.max_model_len)
        if self.tokenizer_pool.max_pending_chars is None:
            self.tokenizer_pool.max_pending_chars = PENDING_PROMPTS_OF_WORK * self._max_prompt_chars
        return self._max_prompt_chars

    def not_ready_reason(self) -> str | None:
        """Why the server cannot take requests now, or None when it can."""
        if self.load_error is not None:  # the details (paths) are in the server log only
            return "the model failed to load (the server log says why)"
        if self.async_engine is None:
            return "the model is still loading"
        if self.draining:
            return "the server is shutting down"
        if self.async_engine.error is not None:
            return f"the engine loop has stopped: {self.async_engine.error!r}"
        stalled_for = time.monotonic() - self.last_progress
        if self.in_flight and stalled_for > self.settings.stall_timeout_s:
            return f"the engine made no progress for {stalled_for:.0f} s"
        return None

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    def require_ready(self) -> AsyncLLMEngine:
        reason = self.not_ready_reason()
        if reason is not None:
            self.metrics.rejected.inc()
            raise APIError(503, reason, code="not_ready", headers=self._retry_after())
        return self.async_engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    def admit(self, num_sequences: int) -> Callable[[], None]:
        """Take `num_sequences` places in the bounded queue, or raise 503 when it is full.
        Returns the release function (safe to call more than once)."""
        limit = self.settings.max_queued_requests
        if num_sequences > limit:  # can never succeed: not a reason to retry
            raise APIError(400, f"this request needs {num_sequences} sequences (prompts x n) but "
                           f"this server holds at most {limit} at once (--max-queued-requests)",
                           param="n", code="request_too_large")
        if self.in_flight + num_sequences > limit:
            self.metrics.rejected.inc()
            raise APIError(503, f"the server is at capacity ({self.in_flight} sequences in "
                           f"flight, limit {limit}); retry later", code="overloaded",
                           headers=self._retry_after())
        if self.in_flight == 0:
            self.last_progress = time.monotonic()  # idle time is not a stall
        self.in_flight += num_sequences
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= num_sequences

        return release

    def cut_streams(self, message: str) -> int:
        """End every request in flight with a 503 error (an error event and [DONE] for a
        stream); returns how many were cut."""
        for queue in self.output_queues:
            queue.put_nowait((-1, APIError(503, message, code="server_shutdown")))
        return len(self.output_queues)

    def progressed(self) -> None:
        self.last_progress = time.monotonic()
