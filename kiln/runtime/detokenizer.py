"""Incremental detokenization: token ids in, text deltas out, UTF-8 safe, stop strings cut.

Two things make streaming text harder than `decode(all_ids)` once at the end:

1. A byte-level BPE token can end in the middle of a multi-byte UTF-8 character (an emoji
   is 4 bytes, often 2-3 tokens). Decoding such a token alone yields U+FFFD. We re-decode a
   small window of tokens (vLLM's prefix/read offsets) and hold back the new text while it
   still ends in U+FFFD, i.e. until the character is complete.

       token ids   ... | p p p p p | r r r | n n
                         ^prefix_offset      ^ new tokens
                                   ^read_offset
       delta = decode(p..n)[len(decode(p..r)):]   (decoding from a few tokens back keeps
                                                   word-boundary spaces right)

2. A stop string may span tokens, and none of it may ever reach the client. Decoded text
   that could still be the start of a stop string is held back until the next tokens show
   it is not (or it completes, and the text is cut before it).

Invariant: the concatenation of every string returned by `update` and `finish` equals
`text`, and for valid UTF-8 output without a stop string that is
`tokenizer.decode(output_ids, skip_special_tokens=...)`.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from kiln.runtime.sampling_params import SamplingParams

# Decode windows start this many tokens before the first new one, so tokenizers whose
# decoders strip or add a leading space (SentencePiece "▁") see the word boundary.
INITIAL_CONTEXT_TOKENS = 5
# A character is at most 4 bytes, so an incomplete character spans at most 3 tokens. Text
# that still ends in U+FFFD after this many pending tokens holds invalid UTF-8 from the
# model: emit it rather than re-decode an ever-growing window each step (quadratic work).
# The cost: should an incomplete character sit right at that point, it shows as U+FFFD
# and `text` may then differ from decode(all ids); valid UTF-8 output is never affected.
MAX_PENDING_TOKENS = 8
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text deltas as they are sampled."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        # Only the prompt's tail is kept: it is the decode context of the first output token.
        self._token_ids: list[int] = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        # Returned text as chunks (joined on demand: `+=` on a long string copies it every
        # token), its last few chars (where a stop string may begin), and decoded text not
        # returned yet because it may be the start of a stop string.
        self._emitted_chunks: list[str] = []
        self._emitted_tail = ""
        self._pending = ""
        self._stop_hit: str | None = None
        self._finished = False
        self._lookback = max((len(s) for s in params.stop), default=1) - 1

    @property
    def text(self) -> str:
        """The output text returned so far (the final text once `finish` was called)."""
        if len(self._emitted_chunks) > 1:
            self._emitted_chunks = ["".join(self._emitted_chunks)]
        return self._emitted_chunks[0] if self._emitted_chunks else ""

    @property
    def stop_hit(self) -> str | None:
        """The stop string that ended the text, or None."""
        return self._stop_hit

    @property
    def is_finished(self) -> bool:
        """True after a stop string was hit or `finish` was called: no more text comes."""
        return self._finished

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> str:
        """Add sampled tokens, return the text that is now safe to show.

        stop_terminated: the last of new_token_ids ended the request (EOS or one of
        stop_token_ids); its text is dropped unless include_stop_str_in_output.
        After a stop string was hit this returns "" (the engine should stop the request).
        """
        if self._finished:
            return ""
        if stop_terminated and new_token_ids and not self.params.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        for token_id in new_token_ids:
            self._token_ids.append(token_id)
            self._pending += self._decode_next(force=False)
        return self._advance(final=False)

    def finish(self) -> str:
        """The request ended: flush held-back text (an incomplete UTF-8 tail becomes
        U+FFFD, as in decode) and return it. Idempotent."""
        if self._finished:
            return ""
        self._pending += self._decode_next(force=True)
        delta = self._advance(final=True)
        self._finished = True
        return delta

    def _decode_next(self, force: bool) -> str:
        """New complete text since read_offset, or "" while a character is incomplete."""
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        pending_tokens = len(self._token_ids) - self._read_offset
        incomplete = new_text.endswith(REPLACEMENT_CHAR) or len(new_text) <= len(prefix_text)
        if incomplete and not force and pending_tokens < MAX_PENDING_TOKENS:
            return ""
        # The next window starts at read_offset; older ids are never decoded again.
        del self._token_ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=self.params.skip_special_tokens,
            # Cleanup rewrites " ." → "." across token boundaries: not incremental.
            clean_up_tokenization_spaces=False,
        )

    def _advance(self, final: bool) -> str:
        """Cut at a completed stop string, else return pending text that cannot be the
        start of one (all of it at the end, or when stop strings are shown anyway)."""
        stop_at = self._find_stop()
        if stop_at is not None:
            end, stop = stop_at
            self._stop_hit = stop
            self._finished = True
            return self._emit(end)
        if final or self.params.include_stop_str_in_output:
            return self._emit(len(self._pending))
        return self._emit(self._partial_stop_start())

    def _emit(self, end: int) -> str:
        """Return pending[:end] and drop the rest of what is pending after a stop."""
        delta = self._pending[:end]
        self._pending = self._pending[end:] if not self._finished else ""
        if delta:
            self._emitted_chunks.append(delta)
            tail = self._emitted_tail + delta
            self._emitted_tail = tail[max(0, len(tail) - self._lookback) :]
        return delta

    def _find_stop(self) -> tuple[int, str] | None:
        """The earliest complete stop string, as (end of the text to keep, measured in
        pending chars; the stop string). With include_stop_str_in_output a match may begin
        in already returned text, hence the search over the returned tail too."""
        window = self._emitted_tail + self._pending
        best: tuple[int, str] | None = None
        for stop in self.params.stop:
            index = window.find(stop)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        start, stop = best
        keep = start + len(stop) if self.params.include_stop_str_in_output else start
        # Without include_stop_str_in_output a match never begins in returned text: text
        # that could start a stop string is held back, so keep >= len(tail) here.
        return keep - len(self._emitted_tail), stop

    def _partial_stop_start(self) -> int:
        """Where the longest suffix of the pending text that is a proper prefix of a stop
        string begins (len(pending) when there is none): from there on it is held back."""
        text = self._pending
        hold_from = len(text)
        for stop in self.params.stop:
            # Only positions holding the stop's first char can start a partial match.
            index = text.find(stop[0], max(0, len(text) - len(stop) + 1))
            while index != -1 and index < hold_from:
                if stop.startswith(text[index:]):
                    hold_from = index
                    break
                index = text.find(stop[0], index + 1)
        return hold_from
