"""`kiln eval` and `kiln verify`: argument parsing and the runs behind them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kiln.errors import KilnError
from kiln.evaluate import EVAL_PATHS

DEFAULT_NUM_TOKENS = 50_000
DEFAULT_WINDOW = 1024
DEFAULT_DECODE_BATCH = 64
DEFAULT_VERIFY_PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of"


def _engine_dir(model: str) -> Path:
    """An engine directory, building a source (HF dir, .gguf, 'smollm2') once into the cache."""
    from kiln.compiler.engine_cache import resolve_engine

    return resolve_engine(model)


def cmd_eval(args: argparse.Namespace) -> None:
    from kiln.evaluate.corpus import SHAREGPT, documents, token_stream
    from kiln.evaluate.forward import TeacherForcedModel
    from kiln.evaluate.perplexity import evaluate, format_table

    if args.num_tokens < 1:
        raise KilnError(f"--num-tokens must be at least 1, got {args.num_tokens}")
    if args.window < 2:
        raise KilnError(f"--window must be at least 2 tokens, got {args.window}")
    if args.decode_batch < 1:
        raise KilnError(f"--decode-batch must be at least 1, got {args.decode_batch}")
    # The decode path holds a batch of windows in each model's cache at once: no more than
    # the text needs (a window predicts window - 1 tokens), so a large --decode-batch costs
    # no memory it cannot use.
    windows_needed = -(-args.num_tokens // (args.window - 1))
    max_windows = min(args.decode_batch, windows_needed) if args.path == "decode" else 1
    model = TeacherForcedModel(
        _engine_dir(args.engine), device=args.device, dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype, max_window=args.window, max_windows=max_windows,
    )
    other = None
    if args.compare:
        other = TeacherForcedModel(
            _engine_dir(args.compare), device=args.device, dtype=args.dtype,
            kv_cache_dtype=args.compare_kv_cache_dtype, max_window=args.window,
            max_windows=max_windows,
        )
        if other.vocab_size != model.vocab_size:
            raise KilnError(
                f"--compare {args.compare}: vocabulary of {other.vocab_size} tokens, the engine "
                f"has {model.vocab_size}; compare builds of the same model"
            )
    tokenizer = model.text_tokenizer(args.tokenizer)
    source = args.dataset_path or SHAREGPT
    token_ids = token_stream(tokenizer, documents(source, "evaluation"), args.num_tokens + 1)
    if len(token_ids) < 2:
        raise KilnError(f"{source}: no text to evaluate on")
    window = min(args.window, model.max_window, other.max_window if other else model.max_window)
    print(f"kiln eval: {model.engine.path} on {model.device} ({model.dtype}), "
          f"{'ShareGPT held-out replies' if source == SHAREGPT else source}, windows of {window}"
          + (f", decode path ({max_windows} at a time)" if args.path == "decode" else ""),
          file=sys.stderr)
    result = evaluate(model, token_ids, window=window, num_tokens=args.num_tokens, other=other,
                      progress=not args.no_progress, path=args.path)
    if result.num_tokens < args.num_tokens:
        print(f"kiln eval: the text held only {result.num_tokens:,} of the "
              f"{args.num_tokens:,} tokens asked for", file=sys.stderr)
    print(format_table(result, Path(args.engine).name, Path(args.compare).name if args.compare else None))
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"wrote {path}")


def cmd_verify(args: argparse.Namespace) -> None:
    from kiln.evaluate.layer_diff import run_verify

    if args.against is None and not args.reference_kernels:
        raise KilnError("kiln verify needs --against SRC_OR_ENGINE or --reference-kernels")
    print(run_verify(
        _engine_dir(args.engine),
        against=_engine_dir(args.against) if args.against else None,
        prompt=args.prompt, threshold=args.threshold, device=args.device,
        reference_kernels=args.reference_kernels, tokenizer=args.tokenizer,
    ))


def add_eval_parsers(commands) -> None:
    """Register `kiln eval` and `kiln verify` on the top-level subparsers."""
    evaluate = commands.add_parser(
        "eval", help="perplexity on held-out text; --compare: agreement, KL, perplexity delta"
    )
    evaluate.add_argument("engine", help="engine dir (or a source, built once into the cache)")
    evaluate.add_argument("--compare", metavar="OTHER_ENGINE", default=None,
                          help="the reference engine (e.g. the unquantised build)")
    evaluate.add_argument("--dataset-path", metavar="FILE", default=None,
                          help="text or JSONL ({'text': ...} per line) to evaluate on (default: "
                          "ShareGPT replies of odd-indexed conversations, never used to calibrate)")
    evaluate.add_argument("--tokenizer", metavar="MODEL", default=None,
                          help="read the text with this model's tokenizer (a tokenizer dir, "
                          "engine, .gguf or 'smollm2'); for engines without one, such as "
                          "random-weight builds compared with each other (its ids must fit)")
    evaluate.add_argument("--num-tokens", type=int, default=DEFAULT_NUM_TOKENS,
                          help=f"predicted tokens to evaluate (default {DEFAULT_NUM_TOKENS:,})")
    evaluate.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                          help=f"tokens per forward (default {DEFAULT_WINDOW}, at most the "
                          "engine's max_model_len)")
    evaluate.add_argument("--path", choices=EVAL_PATHS, default="prefill",
                          help="prefill (default): each window in one forward, the prompt "
                          "kernels; decode: windows fed one token a step through the decode "
                          "kernels, as generation runs them (an FP8 cache's decode dots)")
    evaluate.add_argument("--decode-batch", type=int, default=DEFAULT_DECODE_BATCH,
                          help=f"windows decoded together on the decode path (default "
                          f"{DEFAULT_DECODE_BATCH}; each holds a window of KV cache)")
    evaluate.add_argument("--output-json", metavar="PATH", default=None)
    evaluate.add_argument("--kv-cache-dtype", default="auto",
                          help="the engine's KV cache dtype (auto, fp8, bfloat16, ...)")
    evaluate.add_argument("--compare-kv-cache-dtype", default="auto",
                          help="the other engine's KV cache dtype")
    evaluate.add_argument("--dtype", default="auto",
                          help="compute dtype of both (auto: the engine's on a GPU, float32 on the CPU)")
    evaluate.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=cmd_eval)

    verify = commands.add_parser(
        "verify", help="one prompt through two engines (or fast vs reference kernels): "
        "relative error per decoder layer"
    )
    verify.add_argument("engine", help="engine dir (or a source, built once into the cache)")
    verify.add_argument("--against", metavar="SRC_OR_ENGINE", default=None,
                        help="the reference: an engine dir, or a source built into the cache")
    verify.add_argument("--reference-kernels", action="store_true",
                        help="diff this engine's fast kernels against its torch references")
    verify.add_argument("--prompt", default=DEFAULT_VERIFY_PROMPT)
    verify.add_argument("--tokenizer", metavar="MODEL", default=None,
                        help="encode the prompt with this model's tokenizer (engines without "
                        "one: random-weight builds); its ids must fit the vocabulary")
    verify.add_argument("--threshold", type=float, default=0.05,
                        help="relative error that marks a layer as diverged (default 0.05)")
    verify.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    verify.set_defaults(func=cmd_verify)
