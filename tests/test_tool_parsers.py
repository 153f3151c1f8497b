"""Tool-call parsers (kiln/serve/tool_parsers): each format whole and streamed in random
chunkings (a stream must assemble to exactly the whole-text parse), malformed calls (the text
comes back as content, nothing raises), and the choice of a parser from a chat template."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from kiln.serve.tool_parsers import (
    FORMATS, NamedFunctionStream, new_parser, parser_for_template,
)
from kiln.serve.tool_parsers.base import StreamEvents, assemble

ARGUMENT_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
CALLS = st.lists(st.tuples(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
                           st.dictionaries(st.text(max_size=8), ARGUMENT_VALUES, max_size=3)),
                 min_size=1, max_size=3)
JSON_WHITESPACE = " \t\r\n"  # what the parsers hold back between content and calls
CONTENT = st.text(st.characters(blacklist_characters="<[{"), max_size=30)


def hermes_text(content: str, calls) -> str:
    blocks = "".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>\n"
                     for n, a in calls)
    return content + blocks


def llama_text(content: str, calls) -> str:
    return "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)


def mistral_text(content: str, calls) -> str:
    return content + "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls])


def json_array_text(content: str, calls) -> str:
    return json.dumps([{"name": n, "parameters": a} for n, a in calls], indent=1)


WRITERS = {"hermes": hermes_text, "llama3_json": llama_text, "mistral": mistral_text,
           "json_array": json_array_text}


def streamed(parser, text: str, cuts: list[int]):
    """Feed `text` cut at `cuts`; the events in order and what they assemble to."""
    events = StreamEvents()
    previous = 0
    for cut in sorted(set(cuts)) + [len(text)]:
        events.extend(parser.feed(text[previous:cut]))
        previous = cut
    events.extend(parser.finish())
    return events, assemble(events, text, parser.malformed)


def summary(parsed):
    return parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls]


@pytest.mark.parametrize("name", sorted(WRITERS))
@settings(max_examples=60, deadline=None)
@given(content=CONTENT, calls=CALLS, data=st.data())
def test_stream_in_any_chunking_equals_whole_parse(name, content, calls, data):
    text = WRITERS[name](content, calls)
    whole = new_parser(name).parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == \
        [(n, a) for n, a in calls]
    if name in ("hermes", "mistral"):
        assert (whole.content or "") == content.rstrip(JSON_WHITESPACE)
    else:
        assert whole.content is None
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    events, assembled = streamed(new_parser(name), text, cuts)
    assert summary(assembled) == summary(whole)
    # OpenAI's order: a call's first event carries its name, its arguments come after.
    started = set()
    for item in events.items:
        if item[0] == "call":
            assert item[1] == len(started)
            started.add(item[1])
        elif item[0] == "arguments":
            assert item[1] in started


@pytest.mark.parametrize("name", sorted(WRITERS))
@settings(max_examples=80, deadline=None)
@given(text=st.lists(st.sampled_from(list('{}[]",:; \nabc\\<>/_')) | st.sampled_from(
    ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", '"name"', '"arguments"',
     '"parameters"', '{"name": "f", "arguments": ', '{"name": "f", "parameters": ']),
    max_size=24).map("".join), data=st.data())
def test_any_text_never_raises_and_without_calls_is_all_content(name, text, data):
    whole = new_parser(name).parse(text)
    if not whole.tool_calls:
        assert (whole.content or "") == (text if text.strip(JSON_WHITESPACE) else "")
    for call in whole.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    parser = new_parser(name)
    _, assembled = streamed(parser, text, cuts)
    if not parser.malformed:
        assert summary(assembled) == summary(whole)


@pytest.mark.parametrize("name, text", [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'),  # "}" missing
    ("hermes", '<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>'),  # name last
    ("hermes", '<tool_call>\nnot json at all\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": tru}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": "cut off'),
    ("llama3_json", '{"name": "f", "parameters": "not an object"}'),
    ("llama3_json", '{"answer": 42}'),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}} trailing words'),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}},]'),
    ("mistral", "[TOOL_CALLS] nothing"),
    ("json_array", "[]"),
    ("json_array", " \n["),  # leading whitespace comes back too
    ("llama3_json", '  {"answer": 42}'),
])
def test_malformed_calls_come_back_as_content(name, text):
    parsed = new_parser(name).parse(text)
    if name == "llama3_json" and text.endswith("trailing words"):
        # A whole call, then prose: the call stands and the prose is content.
        assert [c.name for c in parsed.tool_calls] == ["f"] and parsed.content == " trailing words"
        return
    assert parsed.tool_calls == [] and parsed.content == text
    events, _ = streamed(new_parser(name), text, list(range(len(text))))  # one char at a time
    sent = "".join(item[-1] for item in events.items if item[0] != "call")
    assert sent  # nothing is swallowed silently


def test_content_before_a_call_streams_before_the_call_is_complete():
    parser = new_parser("hermes")
    first = parser.feed("Let me look that up. <tool")
    assert first.items == [("content", "Let me look that up.")]  # "<tool" may start a marker
    second = parser.feed('_call>\n{"name": "get_weather", "arguments": {"ci')
    assert second.items[0][0] == "call" and second.items[0][3] == "get_weather"
    assert second.items[1] == ("arguments", 0, '{"ci')
    third = parser.feed('ty": "Paris"}}\n</tool_call>')
    assert third.items == [("arguments", 0, 'ty": "Paris"}')]
    assert parser.finish().items == []


def test_llama_json_after_python_tag_and_separated_calls():
    parsed = new_parser("llama3_json").parse(
        '<|python_tag|>{"type": "function", "name": "a", "parameters": {"x": 1}}; '
        '{"name": "b", "parameters": {}}')
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("a", '{"x": 1}'), ("b", "{}")]
    assert parsed.content is None
    # Prose that merely contains a brace later is not a call.
    prose = new_parser("llama3_json").parse("Use {x} here")
    assert prose.content == "Use {x} here" and prose.tool_calls == []


def test_smollm2_style_array_inside_one_tool_call_block():
    parsed = new_parser("hermes").parse(
        '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</tool_call>')
    assert [c.name for c in parsed.tool_calls] == ["a", "b"]


def test_call_ids_are_openai_shaped_and_distinct():
    parsed = new_parser("json_array").parse('[{"name": "a", "parameters": {}}, {"name": "a", "parameters": {}}]')
    ids = [c.id for c in parsed.tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)


def test_named_function_stream():
    stream = NamedFunctionStream("get_weather")
    assert stream.feed("").items == []
    first = stream.feed('{"city"')
    assert first.items[0][0] == "call" and first.items[0][3] == "get_weather"
    assert first.items[1] == ("arguments", 0, '{"city"')
    assert stream.feed(': "Paris"}').items == [("arguments", 0, ': "Paris"}')]
    whole = NamedFunctionStream("get_weather").parse('{"city": "Paris"}')
    assert whole.content is None and whole.tool_calls[0].arguments == '{"city": "Paris"}'
    cut = NamedFunctionStream("get_weather").parse('{"city": "Pa')
    assert cut.tool_calls == [] and cut.content == '{"city": "Pa'


@pytest.mark.parametrize("template, expected", [
    ("{{ '<tool_call>' }}{% if tools %}{% endif %}", "hermes"),
    ("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]", "mistral"),
    ("<|start_header_id|>{{ 'Respond with {\"name\": function name, \"parameters\": ...}' }}", "llama3_json"),
    ("{{ '<|python_tag|>' }}", "llama3_json"),
    ("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}", None),
])
def test_parser_for_template(template, expected):
    assert parser_for_template(template) == expected


def test_unknown_parser_name_is_refused():
    with pytest.raises(ValueError, match="unknown tool-call parser 'xml'.*hermes"):
        new_parser("xml")
    assert set(FORMATS) >= {"hermes", "llama3_json", "mistral"}
