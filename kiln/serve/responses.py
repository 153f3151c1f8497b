"""OpenAI response bodies and stream chunks, built from RequestOutputs.

Choice indices: a request with P prompts and n sequences each has P * n choices, choice
`prompt_index * n + sequence_index` (OpenAI's order for batched completions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kiln.runtime.messages import TokenLogprobs
from kiln.runtime.request_output import CompletionOutput, RequestOutput
from kiln.serve.tool_parsers.base import ParsedOutput, StreamEvents, ToolCallStream
from kiln.serve.tool_parsers.named import NamedFunctionStream
from kiln.serve.tool_parsers.request import NO_TOOLS, ToolPlan


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
    tool_stream: ToolCallStream | NamedFunctionStream | None = None  # its tool-call parser, if any
    num_tool_calls: int = 0


def finish_reason_with_tools(finish_reason: str | None, num_tool_calls: int) -> str | None:
    # OpenAI says "tool_calls" when the model stopped to call; a call cut off by max_tokens
    # stays "length".
    return "tool_calls" if num_tool_calls and finish_reason == "stop" else finish_reason


def tool_deltas(events: StreamEvents, max_calls: int | None) -> list[dict]:
    """OpenAI chat deltas for parser events, in order: content, a call's first delta (index,
    id, type, name, arguments ""), then its argument fragments, each a delta of its own."""
    deltas: list[dict] = []
    for item in events.items:
        if item[0] == "content":
            deltas.append({"content": item[1]})
            continue
        index = item[1]
        if max_calls is not None and index >= max_calls:
            continue
        if item[0] == "call":
            deltas.append({"tool_calls": [{"index": index, "id": item[2], "type": "function",
                                           "function": {"name": item[3], "arguments": ""}}]})
        else:
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": item[2]}}]})
    return deltas


def parsed_message(plan: ToolPlan, text: str) -> tuple[dict, int]:
    """The non-streamed assistant message of a chat choice, and its number of calls."""
    stream = plan.new_stream()
    if stream is None:
        return {"role": "assistant", "content": text}, 0
    parsed: ParsedOutput = stream.parse(text)
    calls = parsed.tool_calls[:plan.max_calls] if plan.max_calls is not None else parsed.tool_calls
    message: dict = {"role": "assistant", "content": parsed.content}
    if calls:
        message["tool_calls"] = [call.as_openai() for call in calls]
    return message, len(calls)


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
    tool_plan: ToolPlan = NO_TOOLS
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
            state = self.choices.get(index)
            if state is None:
                state = self.choices[index] = ChoiceState(
                    tool_stream=self.tool_plan.new_stream() if self.chat else None)
            if state.finished:
                continue  # a sibling sequence is still running; this one said all it had
            if not completion.delta_token_ids and not completion.delta_text and not completion.finished:
                continue
            chunks.extend(self.chunk([choice]) for choice in self._choices(index, completion, state))
        return chunks

    def _choices(self, index: int, completion: CompletionOutput, state: ChoiceState) -> list[dict]:
        """One step of one choice: usually one choice dict; with a tool parser, one per delta
        it produced (a call's first delta and its argument fragments go separately)."""
        new_entries = (completion.logprobs or [])[state.num_tokens:]
        self.completion_tokens += len(completion.delta_token_ids)
        state.num_tokens += len(completion.delta_token_ids)
        state.finished = completion.finished
        logprobs = None
        if self.logprobs:
            logprobs = (chat_logprobs(new_entries, self.token_text) if self.chat else
                        completion_logprobs(new_entries, self.token_text, state.num_chars))
        state.num_chars += len(completion.delta_text)
        finish_reason = completion.finish_reason
        if not self.chat:
            deltas = [{"text": completion.delta_text}]
        elif state.tool_stream is not None:
            events = state.tool_stream.feed(completion.delta_text)
            if completion.finished:
                events.extend(state.tool_stream.finish())
            deltas = [{"delta": delta} for delta in tool_deltas(events, self.tool_plan.max_calls)]
            state.num_tool_calls = state.tool_stream.num_calls
            if self.tool_plan.max_calls is not None:
                state.num_tool_calls = min(state.num_tool_calls, self.tool_plan.max_calls)
            finish_reason = finish_reason_with_tools(finish_reason, state.num_tool_calls)
            if not deltas and (completion.finished or self.logprobs or self.return_token_ids):
                deltas = [{"delta": {}}]  # the finish reason, logprobs or token ids still go
        else:
            deltas = [{"delta": {"content": completion.delta_text}
                       if completion.delta_text or not completion.finished else {}}]
        choices = []
        for position, delta in enumerate(deltas):
            first, last = position == 0, position == len(deltas) - 1
            choice: dict = {"index": index, **delta}
            choice["logprobs"] = logprobs if first else None
            choice["finish_reason"] = finish_reason if last else None
            if completion.finished and last:
                choice["stop_reason"] = completion.stop_reason
            if self.return_token_ids:
                choice["token_ids"] = list(completion.delta_token_ids) if first else []
            choices.append(choice)
        return choices

    def usage_chunk(self, prompt_tokens: int) -> dict:
        return {"id": self.response_id, "object": self.object, "created": self.created,
                "model": self.model, "choices": [], "usage": usage(prompt_tokens, self.completion_tokens)}


def full_response(chat: bool, response_id: str, model: str, n: int, finals: dict[int, RequestOutput],
                  token_text: TokenText, logprobs: bool, return_token_ids: bool,
                  tool_plan: ToolPlan = NO_TOOLS) -> dict:
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
            finish_reason = completion.finish_reason
            if chat:
                choice["message"], num_tool_calls = parsed_message(tool_plan, completion.text)
                finish_reason = finish_reason_with_tools(finish_reason, num_tool_calls)
                choice["logprobs"] = chat_logprobs(entries, token_text) if logprobs else None
            else:
                choice["text"] = completion.text
                choice["logprobs"] = completion_logprobs(entries, token_text, 0) if logprobs else None
            choice["finish_reason"] = finish_reason
            choice["stop_reason"] = completion.stop_reason
            if return_token_ids:
                choice["token_ids"] = list(completion.token_ids)
                choice["prompt_token_ids"] = list(output.prompt_token_ids)
            choices.append(choice)
    choices.sort(key=lambda choice: choice["index"])
    return {"id": response_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}
