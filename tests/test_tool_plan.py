"""ToolPlan (kiln/serve/tool_parsers/request.py): which parser and which schema a request's
tool_choice gets, the schema `required` hands the grammar engine, and the parser setting."""

from __future__ import annotations

import argparse

import jsonschema_rs
import pytest

from kiln.serve.cli import add_serve_parser
from kiln.serve.errors import APIError
from kiln.serve.protocol import ChatCompletionRequest
from kiln.serve.state import ServeSettings
from kiln.serve.tool_parsers.request import plan_tools
from tests.serve.tool_templates import LLAMA31, QWEN25

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME], **fields})


def test_auto_takes_the_templates_format_unless_the_server_names_one():
    assert plan_tools(request(), QWEN25, None).parser == "hermes"
    assert plan_tools(request(), LLAMA31, None).parser == "llama3_json"
    assert plan_tools(request(), QWEN25, "llama3_json").parser == "llama3_json"
    mistral = plan_tools(request(tool_choice="auto"), QWEN25, "mistral")
    assert mistral.keep_special_tokens and mistral.schema is None
    assert plan_tools(request(parallel_tool_calls=False), QWEN25, None).max_calls == 1


def test_none_shows_no_tools_and_parses_nothing():
    plan = plan_tools(request(tool_choice="none"), QWEN25, None)
    assert plan.template_tools is None and plan.parser is None and plan.schema is None
    assert plan_tools(request(tools=None), QWEN25, None).parser is None


@pytest.mark.parametrize("parallel", [True, False])
def test_required_schema_accepts_exactly_known_calls(parallel):
    plan = plan_tools(request(tool_choice="required", parallel_tool_calls=parallel), LLAMA31, None)
    assert plan.parser == "json_array"
    validator = jsonschema_rs.validator_for(plan.schema)
    one = [{"name": "get_weather", "parameters": {"city": "Paris"}}]
    two = one + [{"name": "get_time", "parameters": {}}]
    assert validator.is_valid(one)
    assert validator.is_valid(two) == parallel
    for bad in ([], [{"name": "launch", "parameters": {}}],
                [{"name": "get_weather", "parameters": {"town": "Paris"}}],
                [{"name": "get_weather", "parameters": {"city": "Paris"}, "extra": 1}],
                {"name": "get_time", "parameters": {}}):
        assert not validator.is_valid(bad), bad


def test_named_function_schema_is_its_parameters():
    plan = plan_tools(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
                      QWEN25, None)
    assert (plan.parser, plan.named_function) == ("named", "get_weather")
    assert plan.schema == WEATHER["function"]["parameters"]
    no_parameters = plan_tools(request(tool_choice={"type": "function", "function": {"name": "get_time"}}),
                               QWEN25, None)
    assert no_parameters.schema == {"type": "object"}


def test_template_without_a_known_format_needs_the_setting():
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{{ tools }}"
    with pytest.raises(APIError, match="--tool-call-parser"):
        plan_tools(request(), template, None)
    assert plan_tools(request(), template, "hermes").parser == "hermes"
    assert plan_tools(request(tool_choice="required"), template, None).parser == "json_array"


def test_the_parser_setting_is_checked():
    with pytest.raises(ValueError, match="tool_call_parser must be one of hermes, llama3_json, mistral"):
        ServeSettings(tool_call_parser="xml")
    commands = argparse.ArgumentParser().add_subparsers()
    serve = add_serve_parser(commands)
    assert serve.parse_args(["m", "--tool-call-parser", "hermes"]).tool_call_parser == "hermes"
    with pytest.raises(SystemExit):
        serve.parse_args(["m", "--tool-call-parser", "xml"])
