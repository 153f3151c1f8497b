"""An engine's tokenizer comes only from the files its manifest lists and hashes (issue 15,
defect 4): files dropped into <engine>/tokenizer/ afterwards change nothing, with a warning
naming them."""

from __future__ import annotations

import json
import logging
import shutil

from kiln.checkpoint.tokenizer import chat_template_of, load_tokenizer

EVIL_TEMPLATE = "{% for m in messages %}EVIL {{ m.content }}{% endfor %}"


def test_unlisted_tokenizer_files_are_ignored_with_a_warning(engine_dir, tmp_path, caplog):
    engine = tmp_path / "engine"
    engine.mkdir()
    for path in engine_dir.iterdir():
        if path.name == "tokenizer":
            shutil.copytree(path, engine / "tokenizer")
        else:
            (engine / path.name).symlink_to(path)
    original = load_tokenizer(engine / "tokenizer")
    (engine / "tokenizer" / "chat_template.jinja").write_text(EVIL_TEMPLATE)
    (engine / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    config_path = engine / "tokenizer" / "tokenizer_config.json"
    with caplog.at_level(logging.WARNING, logger="kiln"):
        tokenizer = load_tokenizer(engine / "tokenizer")
    assert tokenizer.eos_token == original.eos_token != "<|endoftext|>"
    template = chat_template_of(tokenizer, engine / "tokenizer")
    assert template == chat_template_of(original, engine / "tokenizer")
    assert "EVIL" not in (template or "")
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "chat_template.jinja" in warning and "special_tokens_map.json" in warning
    assert "not in the engine manifest" in warning
    assert config_path.is_file()  # the listed files are still the ones used
