"""`kiln bench serve` against a live server: Poisson and fixed-concurrency points, every
request completes with its full length, the JSON has the latency percentiles, and the plot
is drawn."""

from __future__ import annotations

import argparse
import json

from kiln.bench.serving import add_bench_serve_parser
from tests.serve.conftest import API_KEY


def bench(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_bench_serve_parser(parser.add_subparsers(dest="bench"))
    args = parser.parse_args(["serve", *argv])
    args.func(args)


def test_bench_serve_random_prompts(server, tmp_path, capsys):
    bench(["--base-url", server.url, "--api-key", API_KEY, "--dataset", "random", "--num-prompts", "4",
           "--input-len", "16", "--output-len", "5", "--vocab-size", "49152", "--request-rate", "inf", "8",
           "--concurrency", "2", "--output-dir", str(tmp_path), "--plot"])
    [result_path] = tmp_path.glob("serve-*.json")
    result = json.loads(result_path.read_text())
    assert result["benchmark"] == "serve" and result["gpu"] == "cpu"
    assert [p["label"] for p in result["points"]] == ["rate_inf", "rate_8", "concurrency_2"]
    for point in result["points"]:
        metrics = point["metrics"]
        assert metrics["completed"] == 4 and metrics["failed"] == 0
        assert metrics["output_tokens"] == 20  # ignore_eos: every request its full length
        for name in ("ttft", "tpot", "itl", "e2e"):
            assert 0 < metrics[f"p50_{name}_ms"] <= metrics[f"p99_{name}_ms"]
        assert metrics["output_tok_s"] > 0 and metrics["request_throughput"] > 0
    assert result["metrics"]["rate_8.completed"] == 4
    assert result_path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "rate_inf" in capsys.readouterr().out
    server.wait_idle()


def test_bench_serve_sharegpt_saved_and_replayed(server, tmp_path):
    saved = tmp_path / "requests.jsonl"
    bench(["--base-url", server.url, "--api-key", API_KEY, "--num-prompts", "3", "--concurrency", "3",
           "--max-model-len", "64", "--output-dir", str(tmp_path / "first"), "--save-dataset", str(saved)])
    [result_path] = (tmp_path / "first").glob("serve-*.json")
    result = json.loads(result_path.read_text())
    [point] = result["points"]
    assert point["metrics"]["completed"] == 3 and point["metrics"]["failed"] == 0
    assert result["config"]["dataset"] == "sharegpt" and result["config"]["max_input_len"] <= 64
    # The saved token ids replay the same requests where no ShareGPT data or tokenizer is.
    bench(["--base-url", server.url, "--api-key", API_KEY, "--dataset", "file", "--dataset-path",
           str(saved), "--concurrency", "3", "--output-dir", str(tmp_path / "replay")])
    [replay_path] = (tmp_path / "replay").glob("serve-*.json")
    replay = json.loads(replay_path.read_text())
    for key in ("num_requests", "mean_input_len", "mean_output_len", "max_input_len"):
        assert replay["config"][key] == result["config"][key]
    assert replay["points"][0]["metrics"]["completed"] == 3
    server.wait_idle()
