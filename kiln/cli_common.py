"""Command-line arguments shared by every command that runs an engine."""

from __future__ import annotations

import argparse


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--block-size", type=int, default=16, help="KV cache block size (tokens)")
    group.add_argument("--max-num-seqs", type=int, default=None, help="most requests per step")
    group.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    group.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size, overrides memory sizing")
    group.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="disable reuse of cached prompt prefixes")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.90,
                       help="fraction of GPU memory for weights + KV cache")
    group.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    names = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
             "num_kv_blocks", "enable_prefix_caching", "gpu_memory_utilization", "device")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
