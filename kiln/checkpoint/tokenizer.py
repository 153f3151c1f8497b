"""Tokenizers and chat templates of an engine.

Chat templates are Jinja code that came with a checkpoint: they are rendered by
chat_template.py in Jinja's immutable sandbox with a time and size budget, never in a plain
Environment, so a template can neither reach Python internals (`__class__.__mro__`) nor hang.

An engine's tokenizer is loaded only from the files its manifest lists (and open_engine
hashed): a `chat_template.jinja` or `special_tokens_map.json` dropped into
`<engine>/tokenizer/` later would otherwise change the template or the EOS token of a
verified engine. Unlisted files are ignored, with a warning naming them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from kiln.checkpoint.chat_template import TemplateError, render_chat
from kiln.errors import KilnError

MAX_RENDERED_CHARS = 4 * 1024 * 1024
# The engine manifest beside an engine's tokenizer/ directory (kiln/compiler/manifest.py).
_MANIFEST = "engine.json"
logger = logging.getLogger("kiln")


def engine_tokenizer_files(directory: Path) -> set[str] | None:
    """The files under `directory` that its engine's manifest lists (names relative to it),
    or None when `directory` is not an engine's tokenizer directory."""
    directory = Path(directory)
    manifest_path = directory.parent / _MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError, RecursionError):
        raise KilnError(f"{manifest_path}: unreadable manifest") from None
    if not isinstance(files, dict):
        raise KilnError(f"{manifest_path}: manifest has no 'files' section")
    prefix = directory.name + "/"
    return {name[len(prefix):] for name in files if isinstance(name, str) and name.startswith(prefix)}


def _unlisted(directory: Path, listed: set[str]) -> list[str]:
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    return sorted(present - listed)


def load_tokenizer(directory: Path):
    """A transformers fast tokenizer from local files only (no hub, no remote code). Inside
    an engine, only from the files its manifest lists: they are linked into a private
    directory and loaded from there, so an unlisted file cannot take part."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    listed = engine_tokenizer_files(directory)

    def load(path: Path):
        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise KilnError(f"{directory}: cannot load the tokenizer: {error}") from None

    if listed is None:
        return load(directory)
    unlisted = _unlisted(directory, listed)
    if unlisted:
        logger.warning("%s: ignoring %s: not in the engine manifest (rebuild the engine to "
                       "include them)", directory, ", ".join(unlisted))
    with tempfile.TemporaryDirectory(prefix="kiln-tokenizer-") as staging:
        for name in sorted(listed):
            target = Path(staging) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to((directory / name).resolve())
        return load(Path(staging))


def chat_template_of(tokenizer, directory: Path | None = None) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return template if isinstance(template, str) else template.get("default")
    if directory is not None and (directory / "chat_template.jinja").is_file():
        listed = engine_tokenizer_files(directory)
        if listed is None or "chat_template.jinja" in listed:
            return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return None


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    tools: list[dict] | None = None,
) -> str:
    """Render a chat in the sandbox, within the time and size budget of chat_template.py;
    `tools` (OpenAI tool definitions) is the template's `tools` variable.
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
            add_generation_prompt=add_generation_prompt, tools=tools, max_chars=MAX_RENDERED_CHARS,
        )
    except TemplateError as error:
        raise KilnError(str(error)) from None


def special_tokens_of(tokenizer) -> dict[str, str]:
    """bos_token / eos_token etc. as the template variables HF templates expect."""
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: getattr(tokenizer, name) or "" for name in names}


def model_tokenizer(model: str):
    """The tokenizer of another model (an engine dir, HF dir, .gguf or 'smollm2'), for
    engines that have none (random-weight benchmark engines): text is then read as that
    tokenizer's ids, which any vocabulary at least as large accepts."""
    from kiln.compiler.engine_cache import resolve_engine
    from kiln.compiler.manifest import open_engine

    info = open_engine(resolve_engine(model), verify_hashes=False)
    if info.tokenizer_dir is None:
        raise KilnError(f"{model} has no tokenizer")
    return load_tokenizer(info.tokenizer_dir)


def borrowed_tokenizer(source: str, vocab_size: int, flag: str = "--tokenizer"):
    """A directory of tokenizer files (tokenizer.json), or whatever `model_tokenizer` opens,
    checked to fit a model of `vocab_size` tokens (its ids index that model's embedding)."""
    path = Path(source)
    tokenizer = (load_tokenizer(path) if (path / "tokenizer.json").is_file()
                 else model_tokenizer(source))
    if len(tokenizer) > vocab_size:
        raise KilnError(f"{flag} {source} has {len(tokenizer):,} tokens, more than the "
                        f"model's {vocab_size:,}")
    return tokenizer

