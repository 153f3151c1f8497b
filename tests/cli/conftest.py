"""CLI test fixtures: the real SmolLM2 engine (built once per session into a temporary
KILN_CACHE_DIR), a tiny random-weight engine without a tokenizer, and `kiln` run as a user
runs it: a child process, through a pseudo-terminal (pexpect) when a terminal matters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from tests.helpers import build_tiny_engine

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cli_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-kiln-cache")


@pytest.fixture(scope="session")
def smollm2_engine(cli_cache_dir) -> Path:
    from kiln.compiler.engine_cache import resolve_engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_CACHE_DIR", str(cli_cache_dir))
        return resolve_engine("smollm2")


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory) -> Path:
    """Random weights and no tokenizer: text prompts cannot be used with it."""
    return build_tiny_engine(tmp_path_factory.mktemp("cli-tiny"))


def kiln_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # One torch thread: on a shared CI machine (more runnable processes than cores) OpenMP's
    # spinning threads made a 48-token answer take 62 s instead of 3.6 s. These tests check
    # behaviour, not speed.
    env.update(PYTHONPATH=str(REPO), KILN_CACHE_DIR=str(cache_dir), TERM="xterm",
               COLUMNS="100", LINES="40", OMP_NUM_THREADS="1", **extra)
    env.pop("PYTHONWARNINGS", None)
    return env


def run_kiln(args: list[str], cache_dir: Path, input: str | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess:
    """`kiln ARGS` with pipes for stdin/stdout/stderr (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], input=input,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=kiln_env(cache_dir))


def spawn_kiln(args: list[str], cache_dir: Path, timeout: float = 120) -> pexpect.spawn:
    """`kiln ARGS` on a pseudo-terminal: stdin, stdout and stderr are a tty, Ctrl-C is a
    SIGINT from the terminal, as for a user at a shell. SIGINT starts with its default
    action, as at a user's shell: a test run started in the background by a non-interactive
    shell (`cmd &`) ignores SIGINT, the child would inherit that, and Python then leaves
    Ctrl-C ignored at the prompt."""
    return pexpect.spawn(sys.executable, ["-m", "kiln.cli", *args], cwd=str(REPO),
                         env=kiln_env(cache_dir), encoding="utf-8", timeout=timeout,
                         dimensions=(40, 100), preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def _llm_instances() -> dict:
    return {}


@pytest.fixture
def shared_llms(monkeypatch, _llm_instances):
    """In-process `main([...])` calls reuse one loaded LLM per (model, engine flags) for the
    session: loading the engine again for each call only adds seconds, not coverage."""
    from kiln import entrypoints

    real_llm = entrypoints.LLM

    def cached(model, **knobs):
        key = (str(model), tuple(sorted(knobs.items())))
        if key not in _llm_instances:
            _llm_instances[key] = real_llm(model=model, **knobs)
        return _llm_instances[key]

    monkeypatch.setattr(entrypoints, "LLM", cached)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as kiln_env's OMP_NUM_THREADS, for the same reason
    yield _llm_instances
    torch.set_num_threads(threads)
