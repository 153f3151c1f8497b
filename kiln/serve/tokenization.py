"""Tokenizer work for the server, bounded before it starts and kept off the engine's way.

A prompt's text is measured before it is tokenized: a prompt longer than `max_prompt_chars`
cannot fit the model, whatever it says, and is refused at once (400) instead of costing
seconds of tokenizer time and gigabytes of offsets. The bound is derived from the model:

    max_prompt_chars = max_model_len × (characters of the vocabulary's longest token)

Every token covers at most that many characters of text (a byte-level BPE token's string has
one character per byte, a character at least one byte), so a longer text has more tokens than
the model holds. Tokenizers whose normaliser shrinks text (NFKC of ligatures) are the only way
past it, and only by that small factor; the token count is checked after tokenizing anyway.

What passes runs on the server's own tokenizer thread (`TokenizerPool`): one worker, so a
fast tokenizer is never used by two threads at once (no lock), never the default executor
that the engine loop's steps use, and the characters waiting for it are bounded
(`max_pending_chars`, by default a few whole-context prompts' worth): past that new requests
get 503, so the tokenizer's backlog is always a few seconds of work at most. Many short
prompts at once are never refused by it; the request queue bounds those. The tokenizer
releases the GIL while it works, so the engine keeps stepping. Chat templates render on the
same thread.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from kiln.serve.errors import APIError

T = TypeVar("T")
# A vocabulary without strings to measure (no tokenizer) still gets a finite bound.
_FALLBACK_CHARS_PER_TOKEN = 64


def longest_token_chars(tokenizer) -> int:
    """Characters of the longest string in the tokenizer's vocabulary (added tokens too)."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return _FALLBACK_CHARS_PER_TOKEN
    return max((len(token) for token in vocab), default=_FALLBACK_CHARS_PER_TOKEN)


def max_prompt_chars_for(tokenizer, max_model_len: int) -> int:
    return max_model_len * longest_token_chars(tokenizer)


# The tokenizer backlog allowed, in whole-context prompts (max_prompt_chars each).
PENDING_PROMPTS_OF_WORK = 4


class TokenizerPool:
    """One tokenizer thread, with a bounded amount of text waiting for it."""

    def __init__(self, max_pending_chars: int | None = None) -> None:
        self.max_pending_chars = max_pending_chars  # None: set from the model by the server
        self.pending_chars = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kiln-tokenizer")

    async def run(self, size: int, function: Callable[..., T], *args, **kwargs) -> T:
        """`function(*args, **kwargs)` on the tokenizer thread; `size` is its text's length.
        A job always runs when nothing waits, so one prompt within the cap is never refused."""
        limit = self.max_pending_chars
        if limit is not None and self.pending_chars and self.pending_chars + size > limit:
            raise APIError(503, f"the tokenizer is busy ({self.pending_chars} characters waiting, "
                           f"limit {limit}); retry later", code="overloaded",
                           headers={"Retry-After": "1"})
        self.pending_chars += size
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, functools.partial(function, *args, **kwargs))
        finally:
            self.pending_chars -= size

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def check_prompt_chars(text_chars: int, limit: int, what: str = "prompt") -> None:
    if text_chars > limit:
        raise APIError(400, f"{what} has {text_chars} characters; this model's maximum context "
                       f"cannot hold more than {limit} (checked before tokenizing)",
                       param="prompt" if what == "prompt" else "messages",
                       code="context_length_exceeded")
