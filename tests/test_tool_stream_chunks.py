"""The server's chat chunks for tool calls (kiln/serve/responses.py), from fabricated engine
outputs: the model text is fixed here, so `auto` calls (which random-weight test engines
never write) are checked chunk by chunk against OpenAI's stream shape and the non-streamed
body."""

from __future__ import annotations

import json

import pytest

from kiln.runtime.request_output import CompletionOutput, RequestOutput
from kiln.serve.responses import StreamFormatter, TokenText, full_response
from kiln.serve.tool_parsers.request import NO_TOOLS, ToolPlan

HERMES_ANSWER = ('Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": '
                 '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
                 '"arguments": {"utc": true}}\n</tool_call>')


def outputs(text: str, piece: int, finish_reason: str = "stop") -> list[RequestOutput]:
    """The engine's step outputs for `text`, `piece` characters per step."""
    steps = [text[i:i + piece] for i in range(0, len(text), piece)]
    result = []
    for number, delta in enumerate(steps):
        last = number == len(steps) - 1
        so_far = "".join(steps[:number + 1])
        completion = CompletionOutput(index=0, text=so_far, token_ids=list(range(number + 1)),
                                      finish_reason=finish_reason if last else None,
                                      delta_text=delta, delta_token_ids=[number])
        result.append(RequestOutput("r", None, [1, 2, 3], [completion], finished=last))
    return result


def formatter(plan: ToolPlan) -> StreamFormatter:
    return StreamFormatter(True, "chatcmpl-x", "m", 1, TokenText(None), False, False, False,
                           tool_plan=plan)


def stream_chunks(plan: ToolPlan, text: str, piece: int, finish_reason: str = "stop") -> list[dict]:
    fmt = formatter(plan)
    return [chunk for output in outputs(text, piece, finish_reason) for chunk in fmt.step_chunks(0, output)]


def assembled(chunks: list[dict]) -> dict:
    content, calls, finish_reasons = "", {}, []
    for chunk in chunks:
        [choice] = chunk["choices"]
        content += choice["delta"].get("content", "")
        for call in choice["delta"].get("tool_calls", []):
            assert len(choice["delta"]["tool_calls"]) == 1
            if "id" in call:
                assert call["index"] == len(calls) and call["type"] == "function"
                assert call["function"]["arguments"] == ""
                calls[call["index"]] = {"id": call["id"], "type": "function",
                                        "function": {"name": call["function"]["name"], "arguments": ""}}
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
        if choice["finish_reason"] is not None:
            finish_reasons.append(choice["finish_reason"])
    assert len(finish_reasons) == 1 and chunks[-1]["choices"][0]["finish_reason"] is not None
    return {"content": content or None, "tool_calls": [calls[i] for i in sorted(calls)],
            "finish_reason": finish_reasons[0]}


def whole(plan: ToolPlan, text: str, finish_reason: str = "stop") -> dict:
    final = outputs(text, len(text), finish_reason)[-1]
    body = full_response(True, "chatcmpl-x", "m", 1, {0: final}, TokenText(None), False, False, plan)
    choice = body["choices"][0]
    return {"content": choice["message"]["content"],
            "tool_calls": choice["message"].get("tool_calls", []),
            "finish_reason": choice["finish_reason"]}


def without_ids(answer: dict) -> dict:
    return {**answer, "tool_calls": [{**c, "id": None} for c in answer["tool_calls"]]}


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_auto_calls_stream_as_openai_deltas_and_match_the_whole_body(piece):
    plan = ToolPlan(template_tools=[], parser="hermes")
    chunks = stream_chunks(plan, HERMES_ANSWER, piece)
    streamed = assembled(chunks)
    assert without_ids(streamed) == without_ids(whole(plan, HERMES_ANSWER))
    assert streamed["content"] == "Let me check both."
    assert [c["function"]["name"] for c in streamed["tool_calls"]] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in streamed["tool_calls"]] == \
        [{"city": "Paris"}, {"utc": True}]
    assert streamed["finish_reason"] == "tool_calls"
    # The content went out before the first call's delta.
    first_call = next(i for i, c in enumerate(chunks) if c["choices"][0]["delta"].get("tool_calls"))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:first_call]) \
        == "Let me check both."


def test_parallel_tool_calls_false_keeps_the_first_call():
    plan = ToolPlan(template_tools=[], parser="hermes", max_calls=1)
    streamed = assembled(stream_chunks(plan, HERMES_ANSWER, 5))
    assert [c["function"]["name"] for c in streamed["tool_calls"]] == ["get_weather"]
    assert without_ids(streamed) == without_ids(whole(plan, HERMES_ANSWER))


def test_a_call_cut_off_by_max_tokens_is_length_and_content_when_whole():
    plan = ToolPlan(template_tools=[], parser="hermes")
    cut = HERMES_ANSWER[:60]
    body = whole(plan, cut, "length")
    assert body == {"content": cut, "tool_calls": [], "finish_reason": "length"}
    assert assembled(stream_chunks(plan, cut, 4, "length"))["finish_reason"] == "length"


def test_without_tools_chunks_are_unchanged():
    chunks = stream_chunks(NO_TOOLS, HERMES_ANSWER, 9)
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in chunks[:-1])
    assert assembled(chunks) == {"content": HERMES_ANSWER, "tool_calls": [], "finish_reason": "stop"}
    assert whole(NO_TOOLS, HERMES_ANSWER) == {"content": HERMES_ANSWER, "tool_calls": [],
                                              "finish_reason": "stop"}


def test_named_function_stream_sends_the_header_then_the_text():
    plan = ToolPlan(template_tools=[], parser="named", named_function="get_time")
    chunks = stream_chunks(plan, '{"utc": false}', 4)
    first = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first["function"] == {"name": "get_time", "arguments": ""}
    assert without_ids(assembled(chunks)) == without_ids(whole(plan, '{"utc": false}'))
