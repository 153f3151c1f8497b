"""`kiln generate` as a user runs it: streamed to a terminal, plain into a pipe, prompts
from stdin, several prompts and samples with a header each, the sampling flags reaching the
engine, a note when an answer is cut, token-id prompts for engines without a tokenizer."""

from __future__ import annotations

import argparse
import io
import time

import pexpect
import pytest

from kiln.cli import main, make_parser
from kiln.cli_generate import collect_prompts, parse_token_ids, sampling_params
from kiln.errors import KilnError
from tests.cli.conftest import run_kiln, spawn_kiln

QUESTION = "What is the capital of France?"


class FakeStdin(io.StringIO):
    def __init__(self, text: str = "", tty: bool = False) -> None:
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def parse(*argv: str) -> argparse.Namespace:
    return make_parser().parse_args(["generate", *argv])


def test_streams_to_a_terminal(smollm2_engine, cli_cache_dir):
    """On a pty the answer arrives in many pieces over time, not in one write at the end."""
    child = spawn_kiln(["generate", str(smollm2_engine), "--device", "cpu", "--max-tokens", "48",
                        "--prompt", "Count from one to twenty in words:"], cli_cache_dir)
    arrivals: list[tuple[float, str]] = []
    while True:
        try:
            arrivals.append((time.monotonic(), child.read_nonblocking(4096, timeout=60)))
        except pexpect.EOF:
            break
    child.close()
    assert child.exitstatus == 0, "".join(text for _, text in arrivals)
    output = "".join(text for _, text in arrivals)
    assert "Traceback" not in output
    answer_pieces = [(t, text) for t, text in arrivals if text.strip() and "kiln:" not in text]
    assert len(answer_pieces) >= 5, answer_pieces
    assert answer_pieces[-1][0] - answer_pieces[0][0] > 0.2  # spread over the generation
    assert "answer cut at --max-tokens 48" in output  # the note, on the terminal's stderr


def test_piped_stdin_and_output(smollm2_engine, cli_cache_dir):
    """Prompts from a pipe, one per line; answers into a pipe, each after its header."""
    result = run_kiln(["generate", str(smollm2_engine), "--device", "cpu", "--chat", "--prompt", "-",
                       "--each-line", "--max-tokens", "24"], cli_cache_dir,
                      input=QUESTION + "\n\nName a fruit.\n")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\r" not in result.stdout  # plain text
    first, second = result.stdout.split("--- prompt 2/2: Name a fruit. ---\n")
    assert first.startswith(f"--- prompt 1/2: {QUESTION} ---\n") and "Paris" in first
    assert second.strip()


def test_prompts_samples_seed_stop_and_cut_notes(smollm2_engine, capsys, monkeypatch, shared_llms):
    """In-process (faster): headers per prompt and sample, --seed reproducible, --stop
    honoured, and a note for each answer cut by --max-tokens or by the context."""
    monkeypatch.setattr("sys.stdin", FakeStdin(tty=True))
    argv = ["generate", str(smollm2_engine), "--device", "cpu", "--prompt", "Once upon a time",
            "--prompt", "The best food is", "--n", "2", "--temperature", "1.0", "--seed", "7",
            "--max-tokens", "6", "--min-p", "0.05", "--repetition-penalty", "1.1"]
    assert main(argv) == 0
    first = capsys.readouterr()
    headers = [line for line in first.out.splitlines() if line.startswith("--- prompt")]
    assert headers == ["--- prompt 1/2, sample 1/2: Once upon a time ---",
                       "--- prompt 1/2, sample 2/2: Once upon a time ---",
                       "--- prompt 2/2, sample 1/2: The best food is ---",
                       "--- prompt 2/2, sample 2/2: The best food is ---"]
    assert first.err.count("answer cut at --max-tokens 6") >= 3  # EOS within 6 tokens is rare
    assert main(argv) == 0
    assert capsys.readouterr().out == first.out  # same seed, same answers

    assert main(["generate", str(smollm2_engine), "--device", "cpu", "--chat", "--prompt", QUESTION,
                 "--stop", "Paris", "--max-tokens", "24"]) == 0
    stopped = capsys.readouterr()
    assert "capital of France is" in stopped.out and "Paris" not in stopped.out

    # A 2,000-token budget on a 16-token context: the context ends the answer, and says so.
    assert main(["generate", str(smollm2_engine), "--device", "cpu", "--max-model-len", "16",
                 "--prompt", "One, two, three, four, five,", "--max-tokens", "2000"]) == 0
    context = capsys.readouterr()
    assert "answer cut at the end of the context" in context.err, context


def test_system_prompt_and_flags_reach_the_request():
    args = parse("--system", "Be brief.", "--prompt", "Hi", "--min-p", "0.1", "--stop", "x",
                 "--stop", "y", "--n", "3", "--repetition-penalty", "1.2", "--seed", "5", "--top-k", "0")
    [prompt] = collect_prompts(args, FakeStdin(tty=True))
    assert prompt.engine_prompt == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"}]
    params = sampling_params(args)
    assert (params.min_p, params.stop, params.n, params.repetition_penalty, params.seed,
            params.max_tokens, params.temperature) == (0.1, ["x", "y"], 3, 1.2, 5, 256, 0.0)


def test_prompt_sources_and_their_errors():
    assert parse_token_ids("1, 504 3575") == [1, 504, 3575]
    with pytest.raises(KilnError, match="--prompt-token-ids"):
        parse_token_ids("1,two")
    with pytest.raises(KilnError, match="no prompt"):
        collect_prompts(parse(), FakeStdin(tty=True))
    with pytest.raises(KilnError, match="stdin was empty"):
        collect_prompts(parse(), FakeStdin("\n\n"))
    [piped] = collect_prompts(parse(), FakeStdin("line one\nline two\n"))
    assert piped.engine_prompt == "line one\nline two"


def test_bad_sampling_value_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", FakeStdin(tty=True))
    assert main(["generate", "no-such-model", "--prompt", "hi", "--min-p", "2"]) == 1
    err = capsys.readouterr().err
    assert err == "kiln: error: min_p must be in [0, 1], got 2.0\n"


def test_token_id_prompts_on_an_engine_without_tokenizer(tiny_engine, capsys, monkeypatch, shared_llms):
    monkeypatch.setattr("sys.stdin", FakeStdin(tty=True))
    assert main(["generate", str(tiny_engine), "--device", "cpu", "--prompt-token-ids", "1,2,3",
                 "--prompt-token-ids", "4 5", "--max-tokens", "4"]) == 0
    out = capsys.readouterr()
    answers = [line for line in out.out.splitlines() if not line.startswith("---")]
    assert len(answers) == 2 and all(len(line.split()) == 4 for line in answers), out.out
    assert all(token.isdigit() for line in answers for token in line.split())
    assert main(["generate", str(tiny_engine), "--device", "cpu", "--prompt", "hello"]) == 1
    assert "--prompt-token-ids" in capsys.readouterr().err
