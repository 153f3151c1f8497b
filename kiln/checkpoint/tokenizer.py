"""Tokenizers and chat templates of an engine.

Chat templates are Jinja code that came with a checkpoint: they are rendered in Jinja's
immutable sandbox, never in a plain Environment, so a template cannot reach Python
internals (`__class__.__mro__`, `cycler.__init__.__globals__`, ...).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kiln.errors import KilnError

MAX_RENDERED_CHARS = 4 * 1024 * 1024


def load_tokenizer(directory: Path):
    """A transformers fast tokenizer from local files only (no hub, no remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as error:
        raise KilnError(f"{directory}: cannot load the tokenizer: {error}") from None


def chat_template_of(tokenizer, directory: Path | None = None) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return template if isinstance(template, str) else template.get("default")
    if directory is not None and (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return None


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
) -> str:
    """Render a chat in the sandbox. Raises KilnError for malformed messages or a template
    that fails or tries something the sandbox forbids."""
    if not isinstance(messages, list) or not messages:
        raise KilnError("messages must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise KilnError(f"messages[{index}] must be an object with a string 'role'")
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent)
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = environment.from_string(template)
        rendered = compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **(special_tokens or {})
        )
    except jinja2.exceptions.SecurityError as error:
        raise KilnError(f"chat template tried an unsafe operation: {error}") from None
    except jinja2.exceptions.TemplateError as error:
        raise KilnError(f"chat template failed: {error}") from None
    if len(rendered) > MAX_RENDERED_CHARS:
        raise KilnError(f"chat template produced {len(rendered)} characters (limit {MAX_RENDERED_CHARS})")
    return rendered


def special_tokens_of(tokenizer) -> dict[str, str]:
    """bos_token / eos_token etc. as the template variables HF templates expect."""
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: getattr(tokenizer, name) or "" for name in names}
