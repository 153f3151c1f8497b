"""`kiln bench serve` against a live server: Poisson and fixed-concurrency points, every
request completes with its full length, the JSON has the latency percentiles, and the plot
is drawn."""

from __future__ import annotations

import argparse
import json

import pytest

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
        # Per phase, from the server's histograms: queue and prefill of these 4 requests.
        assert 0 <= metrics["mean_queue_ms"] and 0 < metrics["mean_prefill_ms"]
        assert metrics["p50_prefill_ms"] <= metrics["p99_prefill_ms"]
        assert "mean_first_token_delivery_ms" in metrics
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


def test_phase_metrics_from_histogram_deltas():
    from kiln.bench.serving import parse_phases, phase_metrics

    def text(queue_sum, queue_counts, prefill_sum, prefill_counts):
        lines = ["# HELP kiln_request_queue_time_seconds x"]
        for metric, total, counts in (("kiln_request_queue_time_seconds", queue_sum, queue_counts),
                                      ("kiln_request_prefill_time_seconds", prefill_sum, prefill_counts)):
            for bound, count in zip(("0.01", "0.02", "+Inf"), counts):
                lines.append(f'{metric}_bucket{{le="{bound}",model_name="m"}} {count}')
            lines.append(f'{metric}_count{{model_name="m"}} {counts[-1]}')
            lines.append(f'{metric}_sum{{model_name="m"}} {total}')
        return "\n".join(lines)

    before = parse_phases(text(0.01, (1, 1, 1), 0.02, (0, 1, 1)))
    after = parse_phases(text(0.05, (4, 5, 5), 0.14, (1, 4, 5)))
    metrics = phase_metrics(before, after)
    assert metrics["mean_queue_ms"] == pytest.approx(10.0)
    assert metrics["mean_prefill_ms"] == pytest.approx(30.0)
    assert metrics["p50_queue_ms"] == 10.0 and metrics["p99_queue_ms"] == 20.0
    assert metrics["p50_prefill_ms"] == 20.0
    assert parse_phases("# nothing here") is None
    assert phase_metrics(None, after) == {}
