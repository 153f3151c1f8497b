"""The engine's side of structured outputs: one grammar matcher per constrained sequence.

    add_request ─submit→ compiler worker thread ─CompiledGrammar→ start(): a matcher
    each step, after the scheduler commits tokens:  advance()  accepts the new tokens
    each step, for the rows about to be sampled:    token_bitmask()  fills the host mask

A matcher sees only committed tokens (the scheduler's output_token_ids, after it has dropped
the extra token an overlapped step sampled for a finished request), so its state is always
that of the request's text so far. The engine asks for a step's mask after the previous
step's tokens are committed, while the step's forward runs on the device (engine.py).
"""

from __future__ import annotations

import enum
import logging
import os
from concurrent.futures import Future

import torch

from kiln.structured.bitmask import allocate_token_bitmask
from kiln.structured.compiler import GrammarCompiler
from kiln.structured.params import StructuredOutputsParams

logger = logging.getLogger("kiln.structured")
# Threads filling a step's mask rows (xgrammar's batch matcher, in C++ off the GIL): a
# batch of 64 JSON rows takes a few ms on one thread, and the forward it hides behind may not.
FILL_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))


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
        self._xgrammar = self.compiler._xgrammar
        self.vocab_size = vocab_size
        self._matchers: dict[str, _Matcher] = {}
        self._batch_matcher = self._xgrammar.BatchGrammarMatcher(max_threads=FILL_THREADS)

    def submit(self, params: StructuredOutputsParams) -> Future:
        return self.compiler.submit(params)

    def start(self, request_id: str, compiled_grammar, params: StructuredOutputsParams) -> None:
        """A fresh matcher for a sequence whose grammar is compiled (before its first step)."""
        self._matchers[request_id] = _Matcher(self._xgrammar.GrammarMatcher(compiled_grammar),
                                              params.kind in ("json", "json_object"))

    def drop(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def close(self) -> None:
        self._matchers.clear()
        self.compiler.close()

    @property
    def has_matchers(self) -> bool:
        return bool(self._matchers)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def advance(self, request_id: str, output_token_ids: list[int]) -> GrammarProgress:
        """Feed the sequence's committed tokens the matcher has not seen yet."""
        state = self._matchers[request_id]
        matcher = state.matcher
        for token_id in output_token_ids[state.num_accepted:]:
            if matcher.is_terminated():
                break  # ended earlier in this batch of tokens; the engine finishes it
            if not matcher.accept_token(token_id):
                logger.warning("request %s: token %d breaks its grammar", request_id, token_id)
                return GrammarProgress.REJECTED
            state.num_accepted += 1
        return GrammarProgress.TERMINATED if matcher.is_terminated() else GrammarProgress.RUNNING

    def token_bitmask(self, request_ids: list[str], pin_memory: bool) -> torch.Tensor | None:
        """(R, ceil(V / 32)) int32 host mask for a step's logits rows (one per request id, in
        order): constrained rows from their matchers, every other row all allowed. None when
        no row is constrained."""
        rows = [(row, self._matchers.get(request_id)) for row, request_id in enumerate(request_ids)]
        rows = [(row, state) for row, state in rows
                if state is not None and not state.matcher.is_terminated()]
        if not rows:
            return None
        bitmask = allocate_token_bitmask(len(request_ids), self.vocab_size, pin_memory)
        self._batch_matcher.batch_fill_next_token_bitmask(
            [state.matcher for _, state in rows], bitmask, [row for row, _ in rows])
        json_rows = [row for row, state in rows if state.is_json]
        if json_rows:
            # In numpy: torch's indexed in-place AND costs ~30 ms at 64 rows; this, ~0.1 ms.
            words = bitmask.numpy()
            words[json_rows] &= self.compiler.control_token_ban.numpy()
        return bitmask
