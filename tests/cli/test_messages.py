"""Messages a user acts on: a bad --device, a prompt longer than the context, and a
directory that is not a model each get one kiln line (no traceback, no transformers warning
first, no "building … (once)" first); every engine file gets the same permissions."""

from __future__ import annotations

import os
import stat

import pytest

from kiln.cli import main
from tests.cli.conftest import run_kiln


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "mps"])
def test_bad_device_is_one_line(device, capsys, tmp_path):
    # Refused before the model is even looked up (this one does not exist).
    assert main(["generate", str(tmp_path / "none"), "--prompt", "hi", "--device", device]) == 1
    err = capsys.readouterr().err
    assert err == (f"kiln: error: --device {device!r} is not a device kiln runs on: use cuda, "
                   f"cuda:N (a GPU index) or cpu\n")


def test_a_negative_prefill_cap_is_one_line(capsys, tmp_path):
    # Refused before the model is looked up; 0 is the documented "no cap".
    assert main(["generate", str(tmp_path / "none"), "--prompt", "hi",
                 "--max-prefill-tokens-while-decoding", "-1"]) == 1
    assert capsys.readouterr().err == ("kiln: error: --max-prefill-tokens-while-decoding must "
                                       "be >= 0 (0: no cap); got -1\n")


def test_a_prefill_cap_of_zero_means_none():
    import argparse

    from kiln.cli_common import add_engine_args, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_kwargs(parser.parse_args(["--max-prefill-tokens-while-decoding", "0"])) == {
        "max_prefill_tokens_while_decoding": None}
    assert engine_kwargs(parser.parse_args(["--max-prefill-tokens-while-decoding", "256"])) == {
        "max_prefill_tokens_while_decoding": 256}
    assert engine_kwargs(parser.parse_args([])) == {}  # unset: EngineConfig's (or offline's)


def test_prompt_longer_than_the_context_gets_kilns_line_only(smollm2_engine, cli_cache_dir):
    """9,000 tokens is past SmolLM2's 8,192: transformers used to warn before kiln spoke."""
    result = run_kiln(["generate", str(smollm2_engine), "--device", "cpu", "--max-model-len", "64",
                       "--prompt", "word " * 9000], cli_cache_dir)
    assert result.returncode == 1
    assert result.stderr == ("kiln: error: prompt 1 has 9001 tokens: it fills the whole context "
                             "(max_model_len 64); shorten it or pass a larger --max-model-len\n")


def test_a_directory_that_is_not_a_model_says_so_before_building(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("buy bread\n")
    assert main(["generate", str(tmp_path / "notes"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kiln: error: {tmp_path / 'notes'} is not a model:") and err.count("\n") == 1
    assert "building" not in err
    (tmp_path / "notes.txt").write_text("hi\n")
    assert main(["chat", str(tmp_path / "notes.txt")]) == 1
    assert "is not a model" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "engines").exists()  # nothing half-built


def test_every_engine_file_has_the_same_permissions(smollm2_engine, tiny_engine):
    umask = os.umask(0)
    os.umask(umask)
    for engine in (smollm2_engine, tiny_engine):
        modes = {path.relative_to(engine).as_posix(): stat.S_IMODE(path.stat().st_mode)
                 for path in engine.rglob("*") if path.is_file()}
        assert "rank0.safetensors" in modes and "engine.json" in modes
        assert set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "mps", "meta"])
def test_bad_device_from_the_python_api_is_a_kiln_error(device):
    # LLM(..., device=...) reaches resolve_device without the CLI's check in front of it.
    from kiln.errors import KilnError
    from kiln.runtime.engine import resolve_device

    with pytest.raises(KilnError, match=rf"device '{device}' .*use 'cuda', 'cuda:N' or 'cpu'"):
        resolve_device(device)
