"""The parser for a named `tool_choice`: the grammar engine constrains the whole output to
the function's arguments object, so the output *is* the arguments."""

from __future__ import annotations

import json

from kiln.serve.tool_parsers.base import ParsedOutput, StreamEvents, ToolCall, new_call_id


class NamedFunctionStream:
    """Same interface as ToolCallStream: the call's header goes out at once, then every text
    delta is an arguments fragment."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.call_id = new_call_id()
        self.started = False
        self.text = ""
        self.malformed = False

    @property
    def num_calls(self) -> int:
        return 1 if self.started else 0

    def feed(self, text: str) -> StreamEvents:
        events = StreamEvents()
        if not text:
            return events
        if not self.started:
            self.started = True
            events.call(0, self.call_id, self.name)
        self.text += text
        events.arguments(0, text)
        return events

    def finish(self) -> StreamEvents:
        return StreamEvents()

    def parse(self, text: str) -> ParsedOutput:
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            # Only when cut short (max_tokens) or without a grammar: the text, as content.
            return ParsedOutput(text or None, [])
        return ParsedOutput(None, [ToolCall(self.call_id, self.name, text)])
