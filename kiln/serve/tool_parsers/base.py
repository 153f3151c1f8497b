"""What every tool-call parser shares: the parsed shapes, one call's incremental scanner, and
the streaming state machine the formats are configurations of.

A model writes tool calls as text: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(Hermes, Qwen2.5), `{"name": ..., "parameters": {...}}` (Llama 3.1, optionally after
`<|python_tag|>`), `[TOOL_CALLS][{...}, ...]` (Mistral), or, under `tool_choice: required`,
a bare JSON array of calls. Each parser reads that text incrementally (`feed` per stream
delta, `finish` at the end) and says what to send: content, and OpenAI's `tool_calls` deltas
(first `{index, id, type, function: {name, arguments: ""}}`, then argument fragments).

    content ──marker──► region ──"{"──► call: header (name) ─► arguments ─► tail "}"
       ▲                  │ "["                                              │
       └──── close ◄── between calls (",", ";", "]", "</tool_call>") ◄───────┘

The whole-text `parse` runs the same machine on the whole text, so a stream, however it is
chunked, assembles to exactly what `parse` returns. The one exception is a malformed call:
`parse` then returns the whole text as content (a call whose arguments do not parse is
worse than none), while a stream may already have sent part of the call; the rest of the
stream then goes out as content. Nothing here raises on model output.

A call's `arguments` is the model's own JSON text of the arguments object (not
re-serialised), so argument fragments can be streamed as they arrive.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from kiln.serve.tool_parsers.json_scan import (
    BAD, NEED_MORE, WHITESPACE, ValueScanner, parse_call_header, skip_whitespace,
)

# A call header (`{"type": "function", "name": "..."`, up to the arguments) longer than
# this is not a call: its text goes out as content instead of being held back forever.
MAX_HEADER_CHARS = 1024


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text of an object

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedOutput:
    """A whole answer: content (None when there is none) and the calls, in order."""

    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class StreamEvents:
    """What one `feed` or `finish` says to send, in order: ("content", text),
    ("call", index, id, name) or ("arguments", index, fragment)."""

    items: list[tuple] = field(default_factory=list)

    def content(self, text: str) -> None:
        if not text:
            return
        if self.items and self.items[-1][0] == "content":
            self.items[-1] = ("content", self.items[-1][1] + text)
        else:
            self.items.append(("content", text))

    def call(self, index: int, call_id: str, name: str) -> None:
        self.items.append(("call", index, call_id, name))

    def arguments(self, index: int, fragment: str) -> None:
        if not fragment:
            return
        last = self.items[-1] if self.items else None
        if last is not None and last[0] == "arguments" and last[1] == index:
            self.items[-1] = ("arguments", index, last[2] + fragment)
        else:
            self.items.append(("arguments", index, fragment))

    def extend(self, other: "StreamEvents") -> None:
        for item in other.items:
            if item[0] == "content":
                self.content(item[1])
            elif item[0] == "arguments":
                self.arguments(item[1], item[2])
            else:
                self.items.append(item)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def longest_marker_prefix_at_end(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some marker (text
    that may still become a marker, so it is held back)."""
    longest = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:length]):
                longest = length
                break
    return longest


@dataclass(frozen=True)
class Format:
    """One text format of tool calls, as the states of the machine below need it."""

    # Texts that open a region of calls wherever they appear in the output.
    markers: tuple[str, ...] = ()
    # A region also opens when the output starts (after whitespace) with one of these.
    opening_characters: str = ""
    # After a call object (not in a JSON array): what must follow before more content
    # (Hermes: "</tool_call>"); None: nothing.
    call_close: str | None = None
    # Separates calls of one region outside a JSON array (Llama: ";"); None: one call.
    call_separator: str | None = None


@dataclass
class _Call:
    index: int
    buffer: str = ""  # the call's text from its "{", until its header is known
    header_done: bool = False
    scanner: ValueScanner = field(default_factory=ValueScanner)
    arguments: str = ""
    arguments_done: bool = False


class ToolCallStream:
    """One choice's tool-call parser: `feed(delta)` per text delta, `finish()` at the end;
    each returns the StreamEvents to send."""

    def __init__(self, format_: Format) -> None:
        self.format = format_
        self.state = "content"  # content | region | call | between | close | plain
        self.pending = ""  # text received and not yet decided
        self.held_whitespace = ""  # content whitespace held until non-whitespace follows
        self.at_start = True  # nothing but whitespace seen yet
        self.in_array = False
        self.region_text = ""  # the region's raw text while nothing of it has been sent
        self.call: _Call | None = None
        self.call_names: dict[int, tuple[str, str]] = {}
        self.call_arguments: dict[int, str] = {}
        self.malformed = False

    # -- public -----------------------------------------------------------------------

    def feed(self, text: str) -> StreamEvents:
        events = StreamEvents()
        self.pending += text
        self._advance(events, final=False)
        return events

    def finish(self) -> StreamEvents:
        events = StreamEvents()
        self._advance(events, final=True)
        if self.state in ("region", "call"):
            if self.call is not None and self.call.header_done:
                self.malformed = True  # cut off inside a call's arguments
            else:
                self._give_up(events)  # an unfinished call with nothing sent: it was content
        elif self.state == "close":
            # The model stopped before the closing tag (or in the middle of it): the calls
            # are whole, so they stand.
            self.pending = ""
        if self.state in ("plain", "content"):
            events.content(self.pending)
            self.pending = ""
        if not self.call_names:
            events.content(self.held_whitespace)
        self.held_whitespace = ""
        return events

    @property
    def num_calls(self) -> int:
        return len(self.call_names)

    # -- the machine --------------------------------------------------------------------

    def _emit_content(self, events: StreamEvents, text: str) -> None:
        """Content, with trailing whitespace held until something follows it: whitespace
        between content and a call (or after the last call) is not content."""
        text = self.held_whitespace + text
        stripped = text.rstrip(WHITESPACE)
        self.held_whitespace = text[len(stripped):]
        events.content(stripped)

    def _advance(self, events: StreamEvents, final: bool) -> None:
        while True:
            before = (self.state, len(self.pending))
            if self.state == "content":
                self._content(events, final)
            elif self.state == "region":
                self._region(events)
            elif self.state == "call":
                self._call(events)
            elif self.state == "between":
                self._between(events, final)
            elif self.state == "close":
                self._close(events)
            elif self.state == "plain":
                self._emit_content(events, self.pending)
                self.pending = ""
            if (self.state, len(self.pending)) == before:
                return

    def _content(self, events: StreamEvents, final: bool) -> None:
        fmt = self.format
        if self.at_start:
            stripped = self.pending.lstrip(WHITESPACE)
            if not stripped:
                return
            self.at_start = False
            if stripped[0] in fmt.opening_characters:
                # The leading whitespace goes with the region: content again if it is not calls.
                self.region_text = self.pending[:len(self.pending) - len(stripped)]
                self.pending = stripped
                self.state = "region"
                return
        first = None
        for marker in fmt.markers:
            found = self.pending.find(marker)
            if found >= 0 and (first is None or found < first[0]):
                first = (found, marker)
        if first is not None:
            found, marker = first
            self._emit_content(events, self.pending[:found])
            self.region_text = marker
            self.pending = self.pending[found + len(marker):]
            self.state = "region"
            return
        keep = 0 if final else longest_marker_prefix_at_end(self.pending, fmt.markers)
        self._emit_content(events, self.pending[:len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep:]

    def _region(self, events: StreamEvents) -> None:
        # Right after a marker (or at the start): "[" opens a JSON array of calls, "{" a call.
        position = skip_whitespace(self.pending, 0)
        if position == len(self.pending):
            return
        char = self.pending[position]
        if char == "[" and not self.in_array:
            self.in_array = True
            self.region_text += self.pending[:position + 1]
            self.pending = self.pending[position + 1:]
            return
        if char == "{":
            self.region_text += self.pending[:position]
            self.pending = self.pending[position:]
            self.call = _Call(index=self.num_calls)
            self.state = "call"
            return
        self._give_up(events)

    def _give_up(self, events: StreamEvents) -> None:
        """The region is not calls after all. Nothing of it was sent: its text is content,
        and so is everything after it (no more looking for calls)."""
        if self.call_names:
            self.malformed = True
        held = self.region_text + (self.call.buffer if self.call and not self.call.header_done else "")
        self.call = None
        self.region_text = ""
        self.pending = held + self.pending
        self.state = "plain"
        self._emit_content(events, self.pending)
        self.pending = ""

    def _call(self, events: StreamEvents) -> None:
        call = self.call
        if not call.header_done:
            call.buffer += self.pending
            self.pending = ""
            header = parse_call_header(call.buffer)
            if header == NEED_MORE:
                if len(call.buffer) > MAX_HEADER_CHARS:
                    self._give_up(events)
                return
            if header == BAD:
                self._give_up(events)
                return
            name, arguments_start = header
            call.header_done = True
            call_id = new_call_id()
            self.call_names[call.index] = (call_id, name)
            self.call_arguments[call.index] = ""
            events.call(call.index, call_id, name)
            self.region_text = ""
            self.pending = call.buffer[arguments_start:]
            call.buffer = ""
        if not call.arguments_done:
            end = call.scanner.feed(self.pending)
            piece = self.pending if end is None else self.pending[:end]
            self.pending = "" if end is None else self.pending[end:]
            call.arguments += piece
            self.call_arguments[call.index] += piece
            events.arguments(call.index, piece)
            if end is None:
                return
            call.arguments_done = True
        # After the arguments: whitespace, then the call object's "}".
        position = skip_whitespace(self.pending, 0)
        if position == len(self.pending):
            self.pending = ""
            return
        if self.pending[position] != "}":
            self._broken(events)
            return
        self.pending = self.pending[position + 1:]
        self.call = None
        self.state = "between"

    def _broken(self, events: StreamEvents) -> None:
        """A call went wrong after part of it was sent: the rest of the text is content."""
        self.malformed = True
        self.call = None
        self.state = "plain"

    def _between(self, events: StreamEvents, final: bool) -> None:
        fmt = self.format
        position = skip_whitespace(self.pending, 0)
        if position == len(self.pending):
            return
        char = self.pending[position]
        if self.in_array:
            if char == ",":
                self.pending = self.pending[position + 1:]
                self.state = "region"
            elif char == "]":
                self.pending = self.pending[position + 1:]
                self.in_array = False
                self._after_region()
            else:
                self._broken(events)
            return
        if fmt.call_close is not None:
            self.state = "close"
            return
        if fmt.call_separator is not None and char == fmt.call_separator:
            self.pending = self.pending[position + 1:]
            self.state = "region"
            return
        self._after_region()

    def _after_region(self) -> None:
        self.region_text = ""
        if self.format.call_close is not None:
            self.state = "close"
        else:
            self.state = "content"

    def _close(self, events: StreamEvents) -> None:
        close = self.format.call_close
        if close is None:
            self.state = "content"
            return
        position = skip_whitespace(self.pending, 0)
        rest = self.pending[position:]
        if rest.startswith(close):
            self.pending = rest[len(close):]
            self.state = "content"
        elif not close.startswith(rest):
            self._broken(events)

    # -- whole text -----------------------------------------------------------------------

    def parse(self, text: str) -> ParsedOutput:
        """The whole answer at once (a fresh stream only)."""
        events = self.feed(text)
        events.extend(self.finish())
        return assemble(events, text, self.malformed)


def assemble(events: StreamEvents, text: str, malformed: bool) -> ParsedOutput:
    """The ParsedOutput a list of events adds up to; the whole text as content when a call
    was malformed or its arguments are not a JSON object."""
    content: list[str] = []
    names: dict[int, tuple[str, str]] = {}
    arguments: dict[int, str] = {}
    for item in events.items:
        if item[0] == "content":
            content.append(item[1])
        elif item[0] == "call":
            names[item[1]] = (item[2], item[3])
            arguments[item[1]] = ""
        else:
            arguments[item[1]] += item[2]
    calls = []
    for index in sorted(names):
        try:
            value = json.loads(arguments[index])
        except ValueError:
            value = None
        if not isinstance(value, dict):
            malformed = True
            break
        calls.append(ToolCall(names[index][0], names[index][1], arguments[index]))
    if malformed:
        return ParsedOutput(text or None, [])
    joined = "".join(content)
    return ParsedOutput(joined if joined.strip(WHITESPACE) else None, calls)
