"""Just enough JSON reading for tool calls: a call's header (`{"name": "f", "arguments": `)
from a prefix of text, and where an object or array ends, one character at a time. Whether
the arguments are valid JSON is json.loads' job, once they are whole."""

from __future__ import annotations

import json

WHITESPACE = " \t\r\n"


def skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in WHITESPACE:
        position += 1
    return position


NEED_MORE = "need more"
BAD = "bad"


def _read_json_string(text: str, position: int) -> tuple[str | None, int] | str:
    """The JSON string starting at text[position] == '"': (value, end) or NEED_MORE/BAD."""
    index = position + 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            try:
                return json.loads(text[position:index + 1]), index + 1
            except ValueError:
                return BAD
        if char < " ":
            return BAD  # raw control characters are not allowed in JSON strings
        index += 1
    return NEED_MORE


def parse_call_header(text: str) -> tuple[str, int] | str:
    """`{"name": "f", "arguments": ` (or "parameters"; an optional `"type": "function"`
    first) at the start of `text`: (name, where the arguments value starts), NEED_MORE, or
    BAD. The name must come before the arguments, as every tool-calling template writes it."""
    position = skip_whitespace(text, 0)
    if position == len(text):
        return NEED_MORE
    if text[position] != "{":
        return BAD
    position += 1
    name = None
    seen_keys: set[str] = set()
    while True:
        position = skip_whitespace(text, position)
        if position == len(text):
            return NEED_MORE
        if text[position] != '"':
            return BAD
        key = _read_json_string(text, position)
        if isinstance(key, str):
            return key
        key_text, position = key
        if key_text in seen_keys:
            return BAD
        seen_keys.add(key_text)
        position = skip_whitespace(text, position)
        if position == len(text):
            return NEED_MORE
        if text[position] != ":":
            return BAD
        position = skip_whitespace(text, position + 1)
        if position == len(text):
            return NEED_MORE
        if key_text in ("arguments", "parameters"):
            if name is None or text[position] != "{":
                return BAD
            return name, position
        if key_text not in ("name", "type") or text[position] != '"':
            return BAD
        value = _read_json_string(text, position)
        if isinstance(value, str):
            return value
        value_text, position = value
        if key_text == "name":
            if not value_text:
                return BAD
            name = value_text
        elif value_text != "function":
            return BAD
        position = skip_whitespace(text, position)
        if position == len(text):
            return NEED_MORE
        if text[position] != ",":
            return BAD
        position += 1


class ValueScanner:
    """Finds where a JSON object or array ends, one character at a time (brackets and
    strings only: whether the inside is valid JSON is checked by json.loads at the end)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, text: str) -> int | None:
        """The index in `text` just past the value's end, or None if it goes on."""
        for index, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return index + 1
        return None
