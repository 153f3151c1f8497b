"""The engine's side of structured outputs: one grammar matcher per constrained sequence.

    add_request ─submit→ compiler worker thread ─CompiledGrammar→ start(): a matcher
                (not compiled yet: hold() until compiled() hands the request back)
    each step, after the scheduler commits tokens:  advance()  accepts the new tokens
    each step, for the rows about to be sampled:    token_bitmask()  fills the host mask

A matcher sees only committed tokens (the scheduler's output_token_ids, after it has dropped
the extra token an overlapped step sampled for a finished request), so its state is always
that of the request's text so far. The engine asks for a step's mask after the previous
step's tokens are committed, while the step's forward runs on the device (engine.py).
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import time
from concurrent.futures import Future

import torch

from kiln.structured.bitmask import allocate_token_bitmask, widen_token_bitmask
from kiln.structured.compiler import GrammarCompiler
from kiln.structured.params import StructuredOutputsParams

logger = logging.getLogger("kiln.structured")
# Threads filling a step's mask rows (xgrammar's batch matcher). One: its threads cost more
# than they save at these sizes. Measured, JSON rows at a 49,152-token vocabulary: 64 rows
# 0.6 ms on one thread, 0.9 ms on two (this 2-core CPU); 256 rows 2.4 vs 3.1 ms; on the
# H200's 16-core host, eight threads took 5.6 ms for 64 rows (one thread not yet measured there).
FILL_THREADS = 1


class GrammarProgress(enum.Enum):
    RUNNING = "running"  # more tokens may follow
    TERMINATED = "terminated"  # the grammar is complete: the request ends ("stop")
    REJECTED = "rejected"  # a committed token the grammar does not allow (a kiln bug)


class _Matcher:
    __slots__ = ("matcher", "num_accepted", "is_json")

    def __init__(self, matcher, is_json: bool) -> None:
        self.matcher = matcher
        self.num_accepted = 0  # of the request's output tokens
        self.is_json = is_json  # gets the control-character ban (compiler.py)


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, stop_token_ids)
        self._xgrammar = self.compiler.xgrammar
        self.vocab_size = vocab_size
        self._matchers: dict[str, _Matcher] = {}
        # Requests waiting for their grammar: request id → (the engine's request, its compile).
        self._waiting: dict[str, tuple[object, Future]] = {}
        self._batch_matcher = self._xgrammar.BatchGrammarMatcher(max_threads=FILL_THREADS)
        # Host seconds building masks and advancing matchers, and masks built (benchmarks).
        self.mask_seconds = 0.0
        self.advance_seconds = 0.0
        self.num_masks = 0

    def submit(self, params: StructuredOutputsParams) -> Future:
        """The constraint's compile (cached); raises ValueError at once when it is already
        known not to compile."""
        future = self.compiler.submit(params)
        if future.done() and future.exception() is not None:
            raise ValueError(str(future.exception()))
        return future

    def compile_blocking(self, params: StructuredOutputsParams) -> None:
        """Wait for the constraint's compile; ValueError naming the problem if it fails."""
        error = self.submit(params).exception()
        if error is not None:
            raise ValueError(str(error))

    def hold(self, request_id: str, request: object, future: Future) -> None:
        """Keep a request out of the scheduler until its grammar is compiled."""
        self._waiting[request_id] = (request, future)

    def release(self, request_id: str) -> None:
        """Forget a waiting request (aborted)."""
        self._waiting.pop(request_id, None)

    @property
    def has_waiting(self) -> bool:
        return bool(self._waiting)

    def compiled(self, wait: bool) -> list[tuple[str, object, Future]]:
        """The waiting requests whose compile has ended (request id, request, its Future),
        no longer held. wait: the engine has nothing else to run, so wait up to 10 ms for a
        compile rather than spin."""
        if wait and self._waiting:
            concurrent.futures.wait([future for _, future in self._waiting.values()],
                                    timeout=0.01, return_when=concurrent.futures.FIRST_COMPLETED)
        done = [(request_id, request, future)
                for request_id, (request, future) in self._waiting.items() if future.done()]
        for request_id, _, _ in done:
            del self._waiting[request_id]
        return done

    def start(self, request_id: str, compiled_grammar, params: StructuredOutputsParams) -> None:
        """A fresh matcher for a sequence whose grammar is compiled (before its first step)."""
        self._matchers[request_id] = _Matcher(self._xgrammar.GrammarMatcher(compiled_grammar),
                                              params.kind in ("json", "json_object"))

    def drop(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def close(self) -> None:
        self._matchers.clear()
        self._waiting.clear()
        self.compiler.close()

    @property
    def has_matchers(self) -> bool:
        return bool(self._matchers)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def advance(self, request_id: str, output_token_ids: list[int]) -> GrammarProgress:
        """Feed the sequence's committed tokens the matcher has not seen yet."""
        started = time.perf_counter()
        state = self._matchers[request_id]
        matcher = state.matcher
        progress = GrammarProgress.RUNNING
        for token_id in output_token_ids[state.num_accepted:]:
            if matcher.is_terminated():
                break  # ended earlier in this batch of tokens; the engine finishes it
            if not matcher.accept_token(token_id):
                logger.warning("request %s: token %d breaks its grammar", request_id, token_id)
                progress = GrammarProgress.REJECTED
                break
            state.num_accepted += 1
        if progress is GrammarProgress.RUNNING and matcher.is_terminated():
            progress = GrammarProgress.TERMINATED
        self.advance_seconds += time.perf_counter() - started
        return progress

    def token_bitmask(self, request_ids: list[str], pin_memory: bool) -> torch.Tensor | None:
        """(R, ceil(V / 32)) int32 host mask for a step's logits rows (one per request id, in
        order): constrained rows from their matchers, every other row all allowed. None when
        no row is constrained. xgrammar fills the constrained rows at the grammar's width;
        `widen_token_bitmask` takes them to the logits' width."""
        started = time.perf_counter()
        rows, matchers, json_rows = [], [], []
        for row, request_id in enumerate(request_ids):
            state = self._matchers.get(request_id)
            if state is None or state.matcher.is_terminated():
                continue
            rows.append(row)
            matchers.append(state.matcher)
            if state.is_json:
                json_rows.append(row)
        if not rows:
            return None
        num_rows = len(request_ids)
        grammar_vocab = self.compiler.grammar_vocab_size
        # Unconstrained rows stay all ones; xgrammar writes the constrained ones. Pinned
        # when it is the step's mask as it is (no padding ids to add).
        grammar_words = allocate_token_bitmask(
            num_rows, grammar_vocab, pin_memory and grammar_vocab == self.vocab_size)
        self._batch_matcher.batch_fill_next_token_bitmask(matchers, grammar_words, rows)
        ban = self.compiler.control_token_ban if json_rows else None
        bitmask = widen_token_bitmask(grammar_words, grammar_vocab, self.vocab_size, rows,
                                      json_rows, ban, pin_memory)
        self.mask_seconds += time.perf_counter() - started
        self.num_masks += 1
        return bitmask
