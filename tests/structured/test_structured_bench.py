"""`kiln bench throughput --structured json` as it runs on the GPU: a random-weight engine with
no tokenizer borrows one (--tokenizer, a directory of tokenizer files); both runs, their
ratios and the 50-field schema's compile time land in the result file."""

from __future__ import annotations

import json

from kiln.cli import EXIT_USER_ERROR, main
from tests.helpers import build_tiny_engine
from tests.structured.conftest import PADDED_IDS


def test_throughput_structured_json(smollm2_tokenizer, tmp_path, monkeypatch, capsys):
    engine_dir = build_tiny_engine(tmp_path / "tiny", vocab_size=len(smollm2_tokenizer) + PADDED_IDS)
    smollm2_tokenizer.save_pretrained(tmp_path / "tokenizer")
    monkeypatch.setenv("KILN_BENCH_DIR", str(tmp_path / "results"))
    monkeypatch.chdir(tmp_path)
    command = ["bench", "throughput", str(engine_dir), "--device", "cpu", "--dataset", "random",
               "--num-prompts", "4", "--input-len", "4", "--output-len", "12",
               "--num-kv-blocks", "64", "--structured", "json"]
    assert main(command) == EXIT_USER_ERROR
    assert "--structured needs an engine with a tokenizer" in capsys.readouterr().err
    assert main(command + ["--tokenizer", str(tmp_path / "tokenizer")]) == 0
    captured = capsys.readouterr()
    [written] = (tmp_path / "results").glob("throughput-*.json")
    result = json.loads(written.read_text())
    metrics = result["metrics"]
    assert result["config"]["structured"] == "json"
    assert metrics["batched_output_tokens"] == 48
    assert 4 <= metrics["structured_output_tokens"] <= 48
    assert metrics["structured_over_unconstrained_tok_s"] > 0
    assert 0 < metrics["grammar_compile_ms_50_fields"] < 10_000
    assert "grammar_compile_ms_50_fields" in captured.out
