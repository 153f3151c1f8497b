"""`kiln` itself: --version, a top-level help that lists every command, and help that
answers at once because building the parser imports neither torch nor transformers."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from kiln.cli import make_parser
from kiln.version import __version__
from tests.cli.conftest import REPO, kiln_env

HEAVY = ("torch", "transformers", "triton")


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "--version"], capture_output=True,
                            text=True, cwd=REPO, env=kiln_env(tmp_path), timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"kiln {__version__}"


def test_top_level_help_lists_every_command(capsys):
    commands = _commands(make_parser())
    assert {"build", "inspect", "generate", "chat", "bench", "serve"} <= set(commands)
    help_text = make_parser().format_help()
    for name in commands:
        assert f"\n    {name} " in help_text or f"\n    {name}\n" in help_text, name


def test_help_imports_no_torch_and_is_fast(tmp_path):
    """Every command's --help in a fresh interpreter: torch, transformers and triton stay
    unimported, and the whole process (interpreter start included) is quick."""
    parser = make_parser()
    invocations = [["--help"]] + [[name, "--help"] for name in _commands(parser)]
    invocations += [["bench", name, "--help"] for name in _commands(_commands(parser)["bench"])]
    script = (
        "import sys, contextlib, io\n"
        "from kiln.cli import main\n"
        f"for argv in {invocations!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: main(argv)\n"
        "        except SystemExit: pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO, env=kiln_env(tmp_path), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"help imported {result.stdout.strip()}"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "--help"], capture_output=True,
                            text=True, cwd=REPO, env=kiln_env(tmp_path), timeout=60)
    seconds = time.perf_counter() - started
    assert result.returncode == 0 and "generate" in result.stdout
    # ~0.3 s here (it was ~2.9 s with torch imported); generous for a loaded machine.
    assert seconds < 2.0, f"kiln --help took {seconds:.2f} s"


def test_subcommand_help_shows_defaults():
    commands = _commands(make_parser())
    generate = commands["generate"].format_help()
    assert "(default: 256)" in generate  # --max-tokens
    assert "(default: 0.0)" in generate  # --temperature
    assert "(default: 1)" in generate  # --n
    for flag in ("--prompt-token-ids", "--system", "--stop", "--n", "--min-p",
                 "--repetition-penalty", "--seed", "--each-line"):
        assert flag in generate, flag
    chat = commands["chat"].format_help()
    assert "(default: 1024)" in chat and "/exit" in chat
