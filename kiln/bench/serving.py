"""`kiln bench serve`: online serving latency against a running OpenAI-compatible server.

Replays prompts (ShareGPT, or random token ids) as streaming /v1/completions requests, either
arriving as a Poisson process at each `--request-rate` or kept at a fixed `--concurrency`,
and measures per request, from the client:

    TTFT  send → first streamed token          TPOT  (e2e - TTFT) / (output tokens - 1)
    ITL   gaps between streamed token chunks   E2E   send → last byte

and per phase of TTFT from the server's /metrics histograms (deltas over each load point):
queue (arrival → first scheduled), prefill (first scheduled → first token), and the rest of
the client's mean TTFT (mean_first_token_delivery_ms: detokenizing and streaming it out);
ITL is the decode phase.

reported as mean / p50 / p90 / p99 in ms, with output tokens/s and requests/s. As in vLLM's
benchmark, requests ignore EOS so each produces exactly its sampled output length. One JSON
(kiln's result shape) per sweep, and a latency-vs-rate plot when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kiln.bench.datasets import (
    BenchRequest,
    load_requests,
    sample_sharegpt,
    save_requests,
    synthetic_requests,
)
from kiln.bench.progress import Progress
from kiln.checkpoint.tokenizer import model_tokenizer
from kiln.errors import KilnError

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


class RemoteTokenizer:
    """`encode` through the server's /tokenize, so the bench needs no local model files."""

    def __init__(self, client: httpx.Client) -> None:
        self._client = client

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        response = self._client.post("/tokenize", json={"prompt": text, "add_special_tokens": add_special_tokens})
        if response.status_code != 200:
            raise KilnError(f"/tokenize failed ({response.status_code}): {response.text[:200]}")
        return response.json()["tokens"]


async def send_one(client: httpx.AsyncClient, model: str, request: BenchRequest) -> RequestResult:
    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
            # Unseeded, as vLLM's benchmark: a seed per request would make the server draw each
            # row's random numbers from its own generator.
            "ignore_eos": True, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
    result = RequestResult(ok=False, prompt_len=len(request.prompt_token_ids))
    started = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "stream error")
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(choice.get("token_ids") for choice in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.e2e = time.perf_counter() - started
    result.ok = last is not None
    return result


async def run_point(base_url: str, headers: dict, model: str, requests: list[BenchRequest],
                    request_rate: float | None, concurrency: int | None, seed: int,
                    progress: Progress | None = None) -> tuple[list[RequestResult], float]:
    """One load point: Poisson arrivals at `request_rate` (inf = all at once), or
    `concurrency` requests in flight at all times. `progress` advances per answered request."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(3600, connect=30)) as client:
        await send_one(client, model, BenchRequest(requests[0].prompt_token_ids, 4))  # warm-up
        started = time.perf_counter()
        if concurrency is not None:
            queue = list(reversed(requests))
            results: list[RequestResult] = []

            async def worker() -> None:
                while queue:
                    results.append(await send_one(client, model, queue.pop()))
                    if progress is not None:
                        progress.update()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = random.Random(seed)
            tasks = []
            for request in requests:
                task = asyncio.create_task(send_one(client, model, request))
                if progress is not None:
                    task.add_done_callback(lambda _: progress.update())
                tasks.append(task)
                if request_rate is not None and math.isfinite(request_rate):
                    await asyncio.sleep(rng.expovariate(request_rate))
            results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - started


def _percentiles(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    stats = {f"mean_{name}_ms": 1e3 * statistics.fmean(ordered)}
    for p in PERCENTILES:
        index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
        stats[f"p{p}_{name}_ms"] = 1e3 * ordered[index]
    return stats


def summarise(results: list[RequestResult], duration: float) -> dict[str, float]:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    metrics = {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
        "request_throughput": len(done) / duration, "output_tok_s": output_tokens / duration,
        "total_tok_s": (output_tokens + sum(r.prompt_len for r in done)) / duration,
        "output_tokens": output_tokens,
    }
    metrics.update(_percentiles("ttft", [r.ttft for r in done]))
    metrics.update(_percentiles("tpot", [(r.e2e - r.ttft) / (r.output_tokens - 1)
                                         for r in done if r.output_tokens > 1]))
    metrics.update(_percentiles("itl", [gap for r in done for gap in r.itl]))
    metrics.update(_percentiles("e2e", [r.e2e for r in done]))
    return metrics


PHASES = {"queue": "kiln_request_queue_time_seconds",
          "prefill": "kiln_request_prefill_time_seconds"}


def scrape_phases(base_url: str, headers: dict) -> dict | None:
    """The server's per-phase histograms from /metrics: {phase: {"sum", "count", "buckets":
    {upper bound: cumulative count}}}; None when the server has none (an older server)."""
    try:
        text = httpx.get(f"{base_url.rstrip('/')}/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    return parse_phases(text)


def parse_phases(text: str) -> dict | None:
    found: dict = {phase: {"sum": 0.0, "count": 0.0, "buckets": {}} for phase in PHASES}
    seen = False
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        for phase, metric in PHASES.items():
            if name.startswith(metric + "_sum"):
                found[phase]["sum"] = float(value)
                seen = True
            elif name.startswith(metric + "_count"):
                found[phase]["count"] = float(value)
            elif name.startswith(metric + "_bucket") and 'le="' in name:
                bound = name.split('le="', 1)[1].split('"', 1)[0]
                found[phase]["buckets"][float(bound)] = float(value)
    return found if seen else None


def phase_metrics(before: dict | None, after: dict | None) -> dict[str, float]:
    """Mean, p50 and p99 (upper bound of the histogram bucket holding it) of each phase
    over the requests finished between two scrapes, in ms."""
    if before is None or after is None:
        return {}
    metrics = {}
    for phase in PHASES:
        count = after[phase]["count"] - before[phase]["count"]
        if count <= 0:
            continue
        metrics[f"mean_{phase}_ms"] = 1e3 * (after[phase]["sum"] - before[phase]["sum"]) / count
        bounds = sorted(after[phase]["buckets"])
        for q in (50, 99):
            for bound in bounds:
                done = after[phase]["buckets"][bound] - before[phase]["buckets"].get(bound, 0.0)
                if done >= q / 100 * count:
                    metrics[f"p{q}_{phase}_ms"] = 1e3 * bound
                    break
    return metrics


def plot_latency_vs_rate(points: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda p: p["metrics"]["request_throughput"])
    rates = [p["metrics"]["request_throughput"] for p in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("p50_ttft_ms", "TTFT p50"), ("p99_ttft_ms", "TTFT p99")):
        left.plot(rates, [p["metrics"].get(key, float("nan")) for p in points], marker="o", label=label)
    for key, label in (("p50_itl_ms", "ITL p50"), ("p99_itl_ms", "ITL p99"), ("p50_tpot_ms", "TPOT p50")):
        right.plot(rates, [p["metrics"].get(key, float("nan")) for p in points], marker="o", label=label)
    for axis, name in ((left, "time to first token (ms)"), (right, "per-token latency (ms)")):
        for point, rate in zip(points, rates):  # which load (offered rate or concurrency) it was
            axis.annotate(point["label"], (rate, point["metrics"].get("p50_ttft_ms" if axis is left
                                                                       else "p50_itl_ms", 0)),
                          textcoords="offset points", xytext=(4, -12), fontsize=7)
        axis.set_xlabel("achieved request rate (req/s)")
        axis.set_ylabel(name)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _server_info(client: httpx.Client) -> dict:
    try:
        response = client.get("/v1/models")
    except httpx.HTTPError as error:
        raise KilnError(f"cannot reach the server at {client.base_url}: {error}") from None
    if response.status_code != 200:
        raise KilnError(f"{client.base_url}/v1/models answered {response.status_code}: {response.text[:200]}")
    return response.json()["data"][0]


def cmd_bench_serve(args: argparse.Namespace) -> None:
    import torch

    from kiln.bench.results import write_result
    from kiln.bench.throughput import length_stats
    from kiln.spec.metrics import scrape_speculation_counters, speculation_delta

    api_key = args.api_key or os.environ.get("KILN_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=args.base_url, headers=headers, timeout=60) as client:
        card = _server_info(client)
        model, server_device = args.model or card["id"], card.get("device")
        max_model_len = args.max_model_len or card.get("max_model_len") or 4096
        if args.dataset == "file":
            requests = load_requests(args.dataset_path)[: args.num_prompts]
        elif args.dataset == "sharegpt":
            # A server whose engine has none (random-weight engines): another model's ids.
            tokenizer = model_tokenizer(args.tokenizer) if args.tokenizer else RemoteTokenizer(client)
            requests = sample_sharegpt(tokenizer, args.num_prompts, max_model_len, args.seed)
        else:
            requests = synthetic_requests(args.num_prompts, args.input_len, args.output_len,
                                          args.vocab_size, args.seed)
    if args.save_dataset:
        print(f"saved {len(requests)} requests to {save_requests(requests, args.save_dataset)}")
    loads = [("rate", rate, None) for rate in (args.request_rate or [])]
    loads += [("concurrency", None, c) for c in (args.concurrency or [])]
    if not loads:
        loads = [("rate", float("inf"), None)]
    points = []
    for kind, rate, concurrency in loads:
        spec_before = scrape_speculation_counters(args.base_url, headers)
        phases_before = scrape_phases(args.base_url, headers)
        with Progress(len(requests), f"serve bench, {kind} {rate if kind == 'rate' else concurrency}",
                      "req") as progress:
            results, duration = asyncio.run(run_point(args.base_url, headers, model, requests, rate,
                                                      concurrency, args.seed, progress))
        metrics = summarise(results, duration)
        metrics.update(speculation_delta(spec_before, scrape_speculation_counters(args.base_url, headers)))
        # Per phase: the server's queue wait and prefill (means over the finished requests),
        # the rest of the client's TTFT (first token out through the HTTP stream), decode ITL.
        metrics.update(phase_metrics(phases_before, scrape_phases(args.base_url, headers)))
        if "mean_queue_ms" in metrics and "mean_prefill_ms" in metrics:
            metrics["mean_first_token_delivery_ms"] = (
                metrics["mean_ttft_ms"] - metrics["mean_queue_ms"] - metrics["mean_prefill_ms"])
        label = f"rate_{rate:g}" if kind == "rate" else f"concurrency_{concurrency}"
        points.append({"label": label, "request_rate": rate, "concurrency": concurrency, "metrics": metrics})
        print(f"{label:18s} " + "  ".join(f"{k} {metrics[k]:.1f}" for k in (
            "request_throughput", "output_tok_s", "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms",
            "mean_queue_ms", "mean_prefill_ms", "mean_first_token_delivery_ms")
            if k in metrics))
        errors = [r.error for r in results if not r.ok]
        if errors:
            print(f"  {len(errors)} failed, e.g. {errors[0]}")
    # The server's device, not this client's, is what the figures describe.
    cuda_here = server_device is not None and server_device != "cpu" and torch.cuda.is_available()
    path = write_result(
        "serve", device=torch.device("cuda" if cuda_here else "cpu"), model=model, dtype="server",
        config={"base_url": args.base_url, "dataset": args.dataset, **length_stats(requests),
                "seed": args.seed, "request_rates": args.request_rate, "concurrency": args.concurrency},
        metrics={f"{p['label']}.{name}": value for p in points for name, value in p["metrics"].items()},
        output_dir=args.output_dir,
        extra={"points": points, **({"gpu": server_device} if server_device else {})},
    )
    print(f"wrote {path}")
    if args.plot and len(points) > 0:
        plotted = plot_latency_vs_rate(points, path.with_suffix(".png"), f"{model} at {args.base_url}")
        print(f"wrote {plotted}" if plotted else "matplotlib not installed: no plot")


def add_bench_serve_parser(benches: argparse._SubParsersAction) -> argparse.ArgumentParser:
    serve = benches.add_parser("serve", help="online latency against a running server (TTFT, ITL, TPOT)")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000")
    serve.add_argument("--api-key", default=None, help="or set KILN_API_KEY")
    serve.add_argument("--model", default=None, help="model id to send (default: the server's)")
    serve.add_argument("--dataset", choices=("sharegpt", "random", "file"), default="sharegpt")
    from kiln.bench.cli import add_dataset_file_args, positive_int
    from kiln.bench.results import DEFAULT_DIR_HELP

    serve.add_argument("--num-prompts", type=positive_int, default=200)
    serve.add_argument("--request-rate", type=float, nargs="*", default=None,
                       help="Poisson arrival rates in req/s to sweep (inf = all at once)")
    serve.add_argument("--concurrency", type=int, nargs="*", default=None,
                       help="fixed numbers of requests in flight to sweep")
    serve.add_argument("--input-len", type=int, default=128, help="random dataset only")
    serve.add_argument("--output-len", type=int, default=128, help="random dataset only")
    serve.add_argument("--vocab-size", type=int, default=32000, help="random dataset only")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="ShareGPT length filter (default: the server's max_model_len)")

    add_dataset_file_args(serve)
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--plot", action="store_true", help="write a latency-vs-rate PNG beside the JSON")
    serve.add_argument("--output-dir", default=None, help=DEFAULT_DIR_HELP)
    serve.set_defaults(func=cmd_bench_serve)
    return serve
