"""What a chat request's `tools`, `tool_choice` and `parallel_tool_calls` mean for it: the
tools the chat template sees, the parser its output goes through, and the JSON schema the
grammar engine holds the output to. Every problem is a 400 naming it, before any work.

    tool_choice   template sees   output constrained to            parsed by
    none          no tools        nothing                          nothing (plain content)
    auto          tools           nothing                          the template's format
    required      tools           [{"name", "parameters"}, ...]    json_array
    {function}    tools           that function's parameters       NamedFunctionStream

`required` and a named function need the structured-output engine (kiln.structured); with it
the arguments always parse against the function's schema (vLLM does the same).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kiln.serve.errors import APIError
from kiln.serve.protocol import ChatCompletionRequest, NamedToolChoice, ToolDefinition
from kiln.serve.tool_parsers.base import ToolCallStream
from kiln.serve.tool_parsers.formats import (
    FORMATS, NEEDS_SPECIAL_TOKENS, USER_PARSERS, parser_for_template,
)
from kiln.serve.tool_parsers.named import NamedFunctionStream

# The whole tools list as JSON: it goes into every prompt and, for `required`, into a grammar.
MAX_TOOLS_JSON_CHARS = 256 * 1024
# JSON nesting of one function's parameters schema (each nested object argument adds two
# levels: its schema and its properties): deep schemas make the grammar compile slowly and
# no real function needs them.
MAX_SCHEMA_DEPTH = 32


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request handles tools (see the table above)."""

    # The `tools` template variable (OpenAI's tool dicts), None for no tools.
    template_tools: list[dict] | None
    # The parser of each choice's output: a FORMATS name, "named", or None (no parsing).
    parser: str | None
    # The function a named tool_choice forces.
    named_function: str | None = None
    # The JSON schema the output must follow (required / named), None: unconstrained.
    schema: dict | None = None
    # The parser's marker is a special token: the text must keep special tokens.
    keep_special_tokens: bool = False
    # parallel_tool_calls false: calls after the first are dropped (auto; required has it
    # in the schema).
    max_calls: int | None = None

    def new_stream(self) -> ToolCallStream | NamedFunctionStream | None:
        if self.parser is None:
            return None
        if self.parser == "named":
            return NamedFunctionStream(self.named_function)
        return ToolCallStream(FORMATS[self.parser])


NO_TOOLS = ToolPlan(template_tools=None, parser=None)


def _depth(value: object, limit: int) -> int:
    """Nesting depth of a JSON value, stopping once past `limit`."""
    if limit < 0:
        return 1
    if isinstance(value, dict):
        return 1 + max((_depth(item, limit - 1) for item in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(item, limit - 1) for item in value), default=0)
    return 0


def _check_parameters(index: int, tool: ToolDefinition) -> None:
    parameters = tool.function.parameters
    param = f"tools.{index}.function.parameters"
    name = tool.function.name
    if parameters is None:
        return
    if parameters.get("type", "object") != "object":
        raise APIError(400, f"function {name!r}: parameters must be a JSON schema of an object "
                       f"(\"type\": \"object\"), got type {parameters.get('type')!r}", param=param)
    properties = parameters.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(p, (dict, bool)) for p in properties.values()):
        raise APIError(400, f"function {name!r}: parameters.properties must map each argument "
                       "name to a schema", param=param)
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise APIError(400, f"function {name!r}: parameters.required must be a list of "
                       "argument names", param=param)
    if _depth(parameters, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise APIError(400, f"function {name!r}: parameters schema is nested deeper than "
                       f"{MAX_SCHEMA_DEPTH} levels", param=param)


def _function_schema(tool: ToolDefinition) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object"}


def required_schema(tools: list[ToolDefinition], parallel_tool_calls: bool) -> dict:
    """A JSON array of 1..N calls (exactly 1 without parallel calls), each a known name with
    that function's arguments."""
    calls = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                       "parameters": _function_schema(tool)},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for tool in tools]
    schema: dict = {"type": "array", "minItems": 1,
                    "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def plan_tools(body: ChatCompletionRequest, template: str, configured_parser: str | None) -> ToolPlan:
    """The ToolPlan of a chat request, or APIError(400) naming what is wrong with it."""
    tools = body.tools or []
    choice = body.tool_choice
    if not tools:
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise APIError(400, "tool_choice requires tools: give the functions in tools",
                           param="tool_choice")
        return NO_TOOLS
    names = [tool.function.name for tool in tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise APIError(400, f"tools defines {', '.join(map(repr, duplicates))} more than once",
                       param="tools")
    for index, tool in enumerate(tools):
        _check_parameters(index, tool)
    tool_dicts = [tool.model_dump(exclude_none=True) for tool in tools]
    size = len(json.dumps(tool_dicts))
    if size > MAX_TOOLS_JSON_CHARS:
        raise APIError(400, f"tools are {size} characters of JSON; the limit is "
                       f"{MAX_TOOLS_JSON_CHARS}", param="tools")
    if choice == "none":
        # The model is not to call anything: it is not shown the tools either.
        return NO_TOOLS
    if "tools" not in template:
        raise APIError(400, "this model's chat template does not use tools, so the model would "
                       "never see them: send a template that does (chat_template) or leave "
                       "tools out", param="tools")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools "
                           f"(known: {', '.join(names)})", param="tool_choice")
        return ToolPlan(tool_dicts, "named", named_function=name,
                        schema=_function_schema(tools[names.index(name)]))
    if choice == "required":
        return ToolPlan(tool_dicts, "json_array",
                        schema=required_schema(tools, body.parallel_tool_calls))
    parser = configured_parser or parser_for_template(template)
    if parser is None:
        raise APIError(400, "this model's chat template shows no tool-call format kiln knows; "
                       f"start the server with --tool-call-parser ({', '.join(USER_PARSERS)}) "
                       "or use tool_choice \"required\"", param="tools")
    return ToolPlan(tool_dicts, parser, keep_special_tokens=parser in NEEDS_SPECIAL_TOKENS,
                    max_calls=None if body.parallel_tool_calls else 1)
