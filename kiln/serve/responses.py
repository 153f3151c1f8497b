"""OpenAI response bodies and stream chunks, built from RequestOutputs.

Choice indices: a request with P prompts and n sequences each has P * n choices, choice
`prompt_index * n + sequence_index` (OpenAI's order for batched completions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kiln.runtime.messages import TokenLogprobs
from kiln.runtime.request_output import CompletionOutput, RequestOutput


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Token id → its text (for logprobs), remembered: the same ids repeat a lot."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False) if self._tokenizer else ""
            if len(self._cache) < 65536:
                self._cache[token_id] = text
        return text


def completion_logprobs(entries: list[TokenLogprobs], token_text: TokenText, offset: int) -> dict:
    """The legacy completions shape; `offset` is the text offset of the first entry."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in entries:
        text = token_text(entry.sampled_token_id)
        tokens.append(text)
        token_logprobs.append(entry.sampled_logprob)
        top.append({token_text(t): lp for t, lp in entry.top} or None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprobs], token_text: TokenText) -> dict:
    content = []
    for entry in entries:
        text = token_text(entry.sampled_token_id)
        content.append({
            "token": text, "logprob": entry.sampled_logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": token_text(t), "logprob": lp,
                              "bytes": list(token_text(t).encode())} for t, lp in entry.top],
        })
    return {"content": content}


@dataclass
class ChoiceState:
    """What a stream has already sent for one choice."""

    num_tokens: int = 0
    num_chars: int = 0
    finished: bool = False


@dataclass
class StreamFormatter:
    """Turns each step's RequestOutput into stream chunks (completions or chat)."""

    chat: bool
    response_id: str
    model: str
    n: int
    token_text: TokenText
    logprobs: bool
    return_token_ids: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    choices: dict[int, ChoiceState] = field(default_factory=dict)
    completion_tokens: int = 0

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(self, choices: list[dict]) -> dict:
        body = {"id": self.response_id, "object": self.object, "created": self.created,
                "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return body

    def role_chunk(self, num_choices: int) -> dict:
        return self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None} for i in range(num_choices)])

    def step_chunks(self, prompt_index: int, output: RequestOutput) -> list[dict]:
        chunks = []
        for completion in output.outputs:
            index = prompt_index * self.n + completion.index
            state = self.choices.setdefault(index, ChoiceState())
            if state.finished:
                continue  # a sibling sequence is still running; this one said all it had
            if not completion.delta_token_ids and not completion.delta_text and not completion.finished:
                continue
            chunks.append(self.chunk([self._choice(index, completion, state)]))
        return chunks

    def _choice(self, index: int, completion: CompletionOutput, state: ChoiceState) -> dict:
        new_entries = (completion.logprobs or [])[state.num_tokens:]
        self.completion_tokens += len(completion.delta_token_ids)
        state.num_tokens += len(completion.delta_token_ids)
        state.finished = completion.finished
        logprobs = None
        if self.logprobs:
            logprobs = (chat_logprobs(new_entries, self.token_text) if self.chat else
                        completion_logprobs(new_entries, self.token_text, state.num_chars))
        state.num_chars += len(completion.delta_text)
        choice: dict = {"index": index}
        if self.chat:
            choice["delta"] = {"content": completion.delta_text} if completion.delta_text or not completion.finished else {}
        else:
            choice["text"] = completion.delta_text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = completion.finish_reason
        if completion.finished:
            choice["stop_reason"] = completion.stop_reason
        if self.return_token_ids:
            choice["token_ids"] = list(completion.delta_token_ids)
        return choice

    def usage_chunk(self, prompt_tokens: int) -> dict:
        return {"id": self.response_id, "object": self.object, "created": self.created,
                "model": self.model, "choices": [], "usage": usage(prompt_tokens, self.completion_tokens)}


def full_response(chat: bool, response_id: str, model: str, n: int, finals: dict[int, RequestOutput],
                  token_text: TokenText, logprobs: bool, return_token_ids: bool) -> dict:
    """The non-streaming body: every choice's whole text, finish reason and usage."""
    choices = []
    prompt_tokens = completion_tokens = 0
    for prompt_index in sorted(finals):
        output = finals[prompt_index]
        prompt_tokens += len(output.prompt_token_ids)
        for completion in output.outputs:
            completion_tokens += len(completion.token_ids)
            entries = completion.logprobs or []
            choice: dict = {"index": prompt_index * n + completion.index}
            if chat:
                choice["message"] = {"role": "assistant", "content": completion.text}
                choice["logprobs"] = chat_logprobs(entries, token_text) if logprobs else None
            else:
                choice["text"] = completion.text
                choice["logprobs"] = completion_logprobs(entries, token_text, 0) if logprobs else None
            choice["finish_reason"] = completion.finish_reason
            choice["stop_reason"] = completion.stop_reason
            if return_token_ids:
                choice["token_ids"] = list(completion.token_ids)
                choice["prompt_token_ids"] = list(output.prompt_token_ids)
            choices.append(choice)
    choices.sort(key=lambda choice: choice["index"])
    return {"id": response_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}
