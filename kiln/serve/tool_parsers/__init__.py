"""Tool-call parsers: model text → OpenAI `tool_calls`, whole or streamed.

    parser = new_parser("hermes")          # one per choice
    events = parser.feed(delta_text)       # per stream delta; parser.finish() at the end
    parsed = new_parser("hermes").parse(text)   # ParsedOutput(content, tool_calls)

base.py has the state machine and the shapes, json_scan.py the bits of JSON reading it
needs, formats.py the formats and the choice from a
chat template, named.py the parser of a named `tool_choice`.
"""

from __future__ import annotations

from kiln.serve.tool_parsers.base import ParsedOutput, StreamEvents, ToolCall, ToolCallStream
from kiln.serve.tool_parsers.formats import (
    FORMATS, NEEDS_SPECIAL_TOKENS, USER_PARSERS, parser_for_template,
)
from kiln.serve.tool_parsers.named import NamedFunctionStream


def new_parser(name: str) -> ToolCallStream:
    if name not in FORMATS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(USER_PARSERS)}")
    return ToolCallStream(FORMATS[name])


__all__ = [
    "FORMATS", "NEEDS_SPECIAL_TOKENS", "USER_PARSERS", "NamedFunctionStream", "ParsedOutput",
    "StreamEvents", "ToolCall", "ToolCallStream", "new_parser", "parser_for_template",
]
