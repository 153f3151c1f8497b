"""`kiln bench throughput --structured json` on the tiny engine: both runs, their ratio and the
50-field schema's compile time land in the result file."""

from __future__ import annotations

import json

from kiln.cli import main


def test_throughput_structured_json(structured_engine_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_BENCH_DIR", str(tmp_path / "results"))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "throughput", str(structured_engine_dir), "--device", "cpu",
                 "--dataset", "random", "--num-prompts", "4", "--input-len", "4",
                 "--output-len", "12", "--num-kv-blocks", "64", "--structured", "json"]) == 0
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
