"""Tokenizers and chat templates of an engine.

Chat templates are Jinja code that came with a checkpoint: they are rendered by
chat_template.py in Jinja's immutable sandbox with a time and size budget, never in a plain
Environment, so a template can neither reach Python internals (`__class__.__mro__`) nor hang.
"""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.chat_template import TemplateError, render_chat
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


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
) -> str:
    """Render a chat in the sandbox, within the time and size budget of chat_template.py.
    Raises KilnError for malformed messages or a template that fails, runs too long or
    tries something the sandbox forbids."""
    if not isinstance(messages, list) or not messages:
        raise KilnError("messages must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise KilnError(f"messages[{index}] must be an object with a string 'role'")
    try:
        return render_chat(
            template, messages, special_tokens=special_tokens,
            add_generation_prompt=add_generation_prompt, max_chars=MAX_RENDERED_CHARS,
        )
    except TemplateError as error:
        raise KilnError(str(error)) from None


def special_tokens_of(tokenizer) -> dict[str, str]:
    """bos_token / eos_token etc. as the template variables HF templates expect."""
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: getattr(tokenizer, name) or "" for name in names}
