"""`kiln bench`: counts below 1 refused before anything loads, results in the documented
default directory (never the shell's working directory), and progress on stderr: a bar on
a terminal, plain lines in a log."""

from __future__ import annotations

import io
import json

import pytest

from kiln.bench import results
from kiln.bench.progress import Progress
from kiln.cli import main
from tests.helpers import build_tiny_engine


@pytest.mark.parametrize("command", [["throughput"], ["serve"], ["latency", "--new-tokens", "0"]])
def test_zero_counts_are_refused_up_front(command, capsys):
    argv = ["bench", *command] + (["--num-prompts", "0"] if command[0] != "latency" else [])
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ([] if command[0] == "serve" else ["/no/such/model"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    flag = "--new-tokens" if command[0] == "latency" else "--num-prompts"
    assert err.endswith(f"error: argument {flag}: must be at least 1, got 0")


def test_default_results_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_BENCH_DIR", str(tmp_path / "mine"))
    assert results.results_dir() == tmp_path / "mine"
    monkeypatch.delenv("KILN_BENCH_DIR")
    # Run from this checkout: its benchmarks/results/, wherever the shell is.
    monkeypatch.chdir(tmp_path)
    checkout = results.results_dir()
    assert checkout.is_absolute() and checkout.parts[-2:] == ("benchmarks", "results")
    assert (checkout.parent.parent / "pyproject.toml").is_file()
    # An installed kiln (no checkout around it): the user's cache.
    monkeypatch.setattr(results, "__file__", str(tmp_path / "site-packages/kiln/bench/results.py"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert results.results_dir() == tmp_path / "home" / ".cache" / "kiln" / "bench"


def test_throughput_reports_progress_and_writes_to_the_default_dir(tmp_path, monkeypatch, capsys):
    engine_dir = build_tiny_engine(tmp_path / "tiny")
    capsys.readouterr()  # (transformers' own bars while saving the tiny model)
    monkeypatch.setenv("KILN_BENCH_DIR", str(tmp_path / "results"))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "throughput", str(engine_dir), "--device", "cpu", "--dataset", "random",
                 "--num-prompts", "3", "--input-len", "4", "--output-len", "5",
                 "--sequential-baseline", "--num-kv-blocks", "64"]) == 0
    captured = capsys.readouterr()
    # stderr is not a terminal here: plain lines, the last one at 100 %.
    assert "throughput, batched: 15/15 tok (100%)" in captured.err
    assert "throughput, one at a time: 3/3 req (100%)" in captured.err
    assert "\r" not in captured.err
    [written] = (tmp_path / "results").glob("throughput-*.json")
    assert f"wrote {written}" in captured.out
    assert json.loads(written.read_text())["metrics"]["batched_output_tokens"] == 15
    assert not (tmp_path / "benchmarks").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log():
    terminal = _Terminal()
    with Progress(10, "work", "it", stream=terminal) as progress:
        for _ in range(10):
            progress.update()
    assert "\r" in terminal.getvalue() and "10/10" in terminal.getvalue()
    log = io.StringIO()
    with Progress(10, "work", "it", stream=log, interval=0.0) as progress:
        progress.update(4)
        progress.update(6)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("work: 4/10 it (40%)") and lines[-1].startswith("work: 10/10 it (100%)")
