"""The tool-call text formats kiln reads, by name (`kiln serve --tool-call-parser NAME`), and
the choice of one from a chat template's text."""

from __future__ import annotations

from kiln.serve.tool_parsers.base import Format

FORMATS: dict[str, Format] = {
    # Hermes / Qwen2.5: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one
    # block per call (SmolLM2's variant puts a JSON array of calls in one block).
    "hermes": Format(markers=("<tool_call>",), call_close="</tool_call>"),
    # Llama 3.1/3.2: `{"name": ..., "parameters": {...}}` as the whole answer, optionally
    # after `<|python_tag|>` (a special token: gone from the text unless the request keeps
    # special tokens); several calls separated by ";".
    "llama3_json": Format(markers=("<|python_tag|>",), opening_characters="{",
                          call_separator=";"),
    # Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`. [TOOL_CALLS] is a
    # special token, so this parser needs skip_special_tokens off (see NEEDS_SPECIAL_TOKENS).
    "mistral": Format(markers=("[TOOL_CALLS]",)),
    # What `tool_choice: required` constrains the output to: a bare JSON array of calls.
    "json_array": Format(opening_characters="["),
}
# Parsers whose marker is a special token, so the text must keep special tokens.
NEEDS_SPECIAL_TOKENS = frozenset({"mistral"})
# Names a user may pass to --tool-call-parser (json_array is internal to `required`).
USER_PARSERS = ("hermes", "llama3_json", "mistral")


def parser_for_template(template: str) -> str | None:
    """The format a chat template asks its model to write calls in, from the markers in its
    text; None when it shows none (its model was not taught to call tools, or kiln does not
    know how it does)."""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template
                                        and '"parameters"' in template):
        return "llama3_json"
    return None
