"""Tools reach chat templates as Hugging Face templates expect (`tools` variable; calls
with mapping arguments; tool messages), inside the same sandbox and size budget."""

from __future__ import annotations

import pytest

from kiln.checkpoint.chat_template import TemplateError, render_chat
from kiln.checkpoint.tokenizer import render_chat_template
from kiln.errors import KilnError
from kiln.serve.protocol import ChatMessage, message_dicts
from tests.serve.tool_templates import LLAMA31, QWEN25, SMOLLM2_TOOLS

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "15 C"},
]


def messages() -> list[dict]:
    return message_dicts([ChatMessage.model_validate(m) for m in CONVERSATION])


def test_message_dicts_give_templates_mapping_arguments():
    converted = messages()
    assert converted[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert converted[1]["content"] == ""
    assert converted[2]["tool_call_id"] == "call_1"


@pytest.mark.parametrize("template, call_text, result_text", [
    (QWEN25, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "<tool_response>\n15 C\n</tool_response>"),
    (SMOLLM2_TOOLS, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "<tool_response>\n15 C\n</tool_response>"),
    (LLAMA31, '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
     '<|start_header_id|>ipython<|end_header_id|>\n\n"15 C"<|eot_id|>'),
])
def test_templates_render_tools_calls_and_results(template, call_text, result_text):
    text = render_chat(template, messages(), tools=TOOLS, special_tokens={"bos_token": "<s>"})
    assert '"name": "get_weather"' in text.split(call_text)[0]  # the tool's definition
    assert call_text in text and result_text in text
    without = render_chat(template, [CONVERSATION[0]], special_tokens={"bos_token": "<s>"})
    assert "get_weather" not in without


def test_tools_count_against_the_template_size_budget():
    huge = [{"type": "function", "function": {"name": "f", "description": "x" * 5000}}]
    with pytest.raises(TemplateError, match="size limit"):
        render_chat(QWEN25, [CONVERSATION[0]], tools=huge, max_chars=4000)
    with pytest.raises(KilnError):
        render_chat_template(LLAMA31, [], tools=TOOLS)  # no messages: the one-line error
