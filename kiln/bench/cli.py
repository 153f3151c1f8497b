"""kiln bench throughput | latency: argument parsing and the runs behind them."""

from __future__ import annotations

import argparse
from typing import Callable

from kiln.bench.results import DEFAULT_DIR_HELP
from kiln.cli_common import engine_kwargs
from kiln.errors import KilnError
from kiln.spec.cli_args import add_speculative_arguments, speculative_kwargs


def positive_int(text: str) -> int:
    """An argparse type refusing counts below 1 up front (argparse names the flag): a
    benchmark of zero prompts would otherwise load the model and fail at the end."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_bench_throughput(args: argparse.Namespace) -> None:
    from kiln.bench.datasets import load_requests, sample_sharegpt, save_requests, synthetic_requests
    from kiln.bench.progress import Progress
    from kiln.bench.results import write_result
    from kiln.bench.throughput import (
        grammar_compile_figures, grammar_tokenizer, length_stats, run_batched, run_sequential,
        structured_constraint,
    )
    from kiln.checkpoint.tokenizer import model_tokenizer
    from kiln.entrypoints import LLM

    llm = LLM(model=args.model, **engine_kwargs(args), **speculative_kwargs(args))
    engine = llm.llm_engine
    if args.dataset == "file":
        requests = load_requests(args.dataset_path, engine.model_config.vocab_size)[: args.num_prompts]
    elif args.dataset == "sharegpt":
        tokenizer = model_tokenizer(args.tokenizer) if args.tokenizer else llm.tokenizer
        if tokenizer is None:
            raise KilnError("--dataset sharegpt needs an engine with a tokenizer (or --tokenizer); "
                            "use --dataset random")
        requests = sample_sharegpt(tokenizer, args.num_prompts, engine.max_model_len, args.seed)
    else:
        requests = synthetic_requests(
            args.num_prompts, args.input_len, args.output_len, engine.model_config.vocab_size, args.seed
        )
    if args.save_dataset:
        print(f"saved {len(requests)} requests to {save_requests(requests, args.save_dataset)}")
    if not requests:
        raise KilnError(f"no requests to run: the {args.dataset} dataset gave none")
    total_output = sum(r.output_len for r in requests)
    with Progress(total_output, "throughput, batched", "tok") as progress:
        batched = run_batched(engine, requests, progress)
    metrics = {f"batched_{k}": v for k, v in batched.items()}
    metrics["output_tok_s"] = metrics["batched_output_tok_s"]
    metrics["requests_s"] = metrics["batched_requests_s"]
    if args.structured:
        # The same requests again, each constrained: the grammar's cost is the difference.
        constraint = structured_constraint(args.structured)
        if engine.tokenizer is None:  # random-weight engines: borrow --tokenizer's vocabulary
            if not args.tokenizer:
                raise KilnError("--structured needs an engine with a tokenizer, or --tokenizer "
                                "(a tokenizer directory, engine, .gguf or 'smollm2')")
            engine.tokenizer = grammar_tokenizer(args.tokenizer, engine.model_config.vocab_size)
        metrics.update(grammar_compile_figures(engine))
        with Progress(total_output, f"throughput, structured {args.structured}", "tok") as progress:
            structured = run_batched(engine, requests, progress, constraint)
        metrics.update({f"structured_{k}": v for k, v in structured.items()})
        metrics["structured_over_unconstrained_tok_s"] = (
            structured["output_tok_s"] / batched["output_tok_s"])
        metrics["structured_over_unconstrained_step_ms"] = (
            structured["step_ms_mean"] / batched["step_ms_mean"])
    if args.sequential_baseline:
        with Progress(len(requests), "throughput, one at a time", "req") as progress:
            sequential = run_sequential(engine, requests, progress)
        metrics.update({f"sequential_{k}": v for k, v in sequential.items()})
        metrics["batched_over_sequential"] = metrics["output_tok_s"] / metrics["sequential_output_tok_s"]
    metrics.update(speculation_metrics(engine))
    config = {
        "dataset": args.dataset, **length_stats(requests), "seed": args.seed,
        "structured": args.structured,
        "input_len": args.input_len if args.dataset == "random" else None,
        "output_len": args.output_len if args.dataset == "random" else None,
        "engine": engine.config.model_dump(), "num_kv_blocks": engine.scheduler.config.num_kv_blocks,
    }
    path = write_result(
        "throughput", device=engine.device, model=str(args.model),
        dtype=engine.engine_info.manifest["build"]["dtype"], config=config, metrics=metrics,
        output_dir=args.output_dir,
    )
    for name, value in metrics.items():
        print(f"{name:36s} {value:12.2f}")
    print(f"wrote {path}")


def cmd_bench_latency(args: argparse.Namespace) -> None:
    import torch

    from kiln.bench import latency
    from kiln.bench.progress import Progress
    from kiln.bench.results import write_result
    from kiln.entrypoints import LLM

    metrics: dict = {}
    if args.hf_peer:
        # First, so its memory is free again before kiln sizes its KV cache.
        from kiln.bench.peers import hf_static_cache_decode
        from kiln.compiler.manifest import open_engine
        from kiln.compiler.engine_cache import resolve_engine

        info = open_engine(resolve_engine(args.model), verify_hashes=False)
        metrics.update(hf_static_cache_decode(
            info.model_config, torch.device("cuda"), info.dtype, args.prompt_len, args.new_tokens
        ))
    llm = LLM(model=args.model, **engine_kwargs(args), **speculative_kwargs(args))
    engine = llm.llm_engine
    cuda = engine.device.type == "cuda"
    config = {
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "ttft_prompt_lens": args.ttft_lens, "batch_sizes": args.batch_sizes,
        "engine": engine.config.model_dump(), "num_kv_blocks": engine.scheduler.config.num_kv_blocks,
    }
    startup = engine.startup
    metrics["startup_s"] = startup.total_seconds
    metrics["startup_open_verify_s"] = startup.open_seconds
    metrics["startup_load_s"] = startup.load_seconds
    metrics["startup_kv_profile_s"] = startup.kv_profile_seconds
    metrics["startup_kv_allocation_s"] = startup.kv_allocation_seconds
    if engine.runner.capture_report is not None:
        metrics["graph_capture_s"] = engine.runner.capture_report.seconds
        metrics["graph_memory_mib"] = engine.runner.capture_report.memory_bytes / 2**20
    print(startup.describe())
    if cuda:
        metrics["copy_bandwidth_gb_s"] = latency.measure_copy_bandwidth(engine.device) / 1e9
        metrics["bf16_matmul_tflop_s"] = latency.measure_matmul_peak(engine.device, torch.bfloat16) / 1e12
    # A length past the context is measured at the context's end (latency.ttft_prompt_len).
    ttft_lens = [n for n in args.ttft_lens if n <= engine.max_model_len]
    batch_sizes = [b for b in args.batch_sizes if b <= engine.config.max_num_seqs]
    progress = Progress(1 + len(ttft_lens) + len(batch_sizes), "latency", "measurement")
    latency.decode_speed(engine, 1, args.prompt_len, 16)  # warm-up
    bs1 = latency.decode_speed(engine, 1, args.prompt_len, args.new_tokens)
    progress.update()
    metrics["bs1_decode_tok_s"] = bs1["decode_tok_s"]
    for name in ("step_ms_mean", "cpu_ms_per_step", "gpu_ms_per_step"):
        metrics[f"bs1_{name}"] = bs1[name]
    weight_bytes = latency.weight_bytes_per_token(engine)
    metrics["bytes_per_token_gb"] = weight_bytes / 1e9
    if cuda:
        bytes_per_s = weight_bytes * bs1["decode_tok_s"]
        metrics["bs1_pct_of_copy_bandwidth"] = 100 * bytes_per_s / (metrics["copy_bandwidth_gb_s"] * 1e9)
        metrics["bs1_roofline_tok_s"] = metrics["copy_bandwidth_gb_s"] * 1e9 / weight_bytes
    for requested_len in ttft_lens:
        prompt_len = latency.ttft_prompt_len(engine, requested_len)
        seconds = latency.time_to_first_token(engine, prompt_len)
        progress.update()
        metrics[f"ttft_ms_{requested_len}"] = seconds * 1e3
        if prompt_len != requested_len:
            metrics[f"ttft_prompt_tokens_{requested_len}"] = prompt_len
        flops = latency.prefill_flops(engine, prompt_len)
        metrics[f"prefill_tflop_s_{requested_len}"] = flops / seconds / 1e12
        if cuda:  # the roofline it is held to: every FLOP at the measured GEMM peak
            metrics[f"ttft_roofline_ms_{requested_len}"] = (
                1e3 * flops / (metrics["bf16_matmul_tflop_s"] * 1e12))
    curve = []
    for batch_size in batch_sizes:
        point = latency.decode_speed(engine, batch_size, args.prompt_len, args.batch_new_tokens)
        progress.update()
        curve.append(point)
        metrics[f"decode_tok_s_bs{batch_size}"] = point["decode_tok_s"]
        metrics[f"cpu_ms_per_step_bs{batch_size}"] = point["cpu_ms_per_step"]
        metrics[f"gpu_ms_per_step_bs{batch_size}"] = point["gpu_ms_per_step"]
        if point["finished_before_window"]:
            metrics[f"finished_before_window_bs{batch_size}"] = point["finished_before_window"]
    long_context = []
    if args.long_context_decode:
        long_context = latency.long_context_decode(engine, args.long_context_decode,
                                                   [b for b in (1, 16) if b <= engine.config.max_num_seqs])
        for point in long_context:
            metrics[f"long_context_decode_tok_s_bs{point['batch_size']}"] = point["decode_tok_s"]
            metrics[f"long_context_gpu_ms_per_step_bs{point['batch_size']}"] = point["gpu_ms_per_step"]
        metrics["long_context_len"] = long_context[0]["context_len"]
    metrics.update(speculation_metrics(engine))
    progress.close()
    path = write_result(
        "latency", device=engine.device, model=str(args.model),
        dtype=str(engine.dtype).removeprefix("torch."), config=config, metrics=metrics,
        output_dir=args.output_dir, extra={"decode_curve": curve, "long_context_decode": long_context},
    )
    if curve and args.plot:
        from kiln.bench.plots import plot_decode_curve

        from kiln.bench.results import device_name

        title = f"{engine.model_config.architecture}, {device_name(engine.device)}"
        plot_decode_curve(curve, path.with_suffix(".png"), title=title)
    for name, value in metrics.items():
        print(f"{name:36s} {value:12.2f}")
    print(f"wrote {path}")


def speculation_metrics(engine) -> dict:
    """Acceptance rate and mean accepted length of a speculating engine (else nothing)."""
    if engine.speculator is None:
        return {}
    stats = engine.speculator.stats
    return {"spec_acceptance_rate": stats.acceptance_rate,
            "spec_mean_accepted_length": stats.mean_accepted_length,
            "spec_num_proposed_tokens": stats.num_proposed_tokens}


def add_dataset_file_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset-path", default=None,
                        help="--dataset file: JSON lines of {prompt_token_ids, output_len}")
    parser.add_argument("--save-dataset", default=None, metavar="PATH",
                        help="write the sampled requests as such a file (to replay them elsewhere)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenize ShareGPT with this model's tokenizer (e.g. 'smollm2') instead "
                        "of the engine's; for engines without a tokenizer")


def add_bench_parsers(benches, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    throughput = benches.add_parser("throughput", help="offline throughput of N requests")
    throughput.add_argument("model", nargs="?", default="smollm2")
    throughput.add_argument("--dataset", choices=("sharegpt", "random", "file"), default="sharegpt")
    add_dataset_file_args(throughput)
    throughput.add_argument("--num-prompts", type=positive_int, default=64)
    throughput.add_argument("--input-len", type=positive_int, default=128,
                            help="random dataset only")
    throughput.add_argument("--output-len", type=positive_int, default=128,
                            help="random dataset only")
    throughput.add_argument("--seed", type=int, default=0)
    throughput.add_argument("--sequential-baseline", action="store_true",
                            help="also run the requests one at a time and report the ratio")
    throughput.add_argument("--output-dir", default=None, help=DEFAULT_DIR_HELP)
    # choices: kiln.bench.throughput.STRUCTURED_CHOICES (not imported here: it loads torch).
    throughput.add_argument("--structured", choices=("json",), default=None,
                            help="also run every request constrained to a JSON schema "
                                 "(needs kiln[structured]) and report both, with the grammar "
                                 "compile time of a 50-field schema")
    add_engine_args(throughput)
    add_speculative_arguments(throughput)
    throughput.set_defaults(func=cmd_bench_throughput)

    latency = benches.add_parser("latency", help="batch-1 decode, TTFT, decode vs batch size")
    latency.add_argument("model", nargs="?", default="smollm2")
    latency.add_argument("--prompt-len", type=positive_int, default=5)
    latency.add_argument("--new-tokens", type=positive_int, default=200)
    latency.add_argument("--ttft-lens", type=int, nargs="*", default=[128, 512, 2048, 8192])
    latency.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    latency.add_argument("--batch-new-tokens", type=positive_int, default=64)
    latency.add_argument("--plot", action="store_true", help="write a PNG of decode tok/s vs batch")
    latency.add_argument("--long-context-decode", type=positive_int, default=None, metavar="LEN",
                         help="also decode tok/s at batch 1 and 16 with LEN-token contexts (one "
                         "shared prompt, prefilled once; use with --max-model-len)")
    latency.add_argument("--hf-peer", action="store_true",
                         help="also measure transformers (static cache) at batch 1, same run")
    latency.add_argument("--output-dir", default=None, help=DEFAULT_DIR_HELP)
    add_engine_args(latency)
    add_speculative_arguments(latency)
    latency.set_defaults(func=cmd_bench_latency)

    from kiln.bench.serving import add_bench_serve_parser

    add_bench_serve_parser(benches)
