"""Command-line arguments shared by every command that runs an engine."""

from __future__ import annotations

import argparse
import re

from kiln.config import (CAPACITY_POLICIES, FP8_KV_DEFAULT_BLOCK_SIZE, OFFLINE_GPU_DEFAULTS,
                         EngineConfig)
from kiln.errors import KilnError

# Flags left unset stay out of engine_kwargs, so EngineConfig's own defaults (shown in the
# help) apply: the CLI never restates a default.
_DEFAULTS = EngineConfig()


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--block-size", type=int, default=None,
                       help=f"KV cache block size in tokens (default {_DEFAULTS.block_size}; "
                       f"{FP8_KV_DEFAULT_BLOCK_SIZE} for an FP8 KV cache)")
    group.add_argument("--max-num-seqs", type=int, default=None,
                       help=f"most requests per step (default {_DEFAULTS.max_num_seqs}; offline "
                       f"runs on a GPU {OFFLINE_GPU_DEFAULTS['max_num_seqs']})")
    group.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help=f"token budget per step (default {_DEFAULTS.max_num_batched_tokens}; "
                       f"offline runs on a GPU {OFFLINE_GPU_DEFAULTS['max_num_batched_tokens']})")
    group.add_argument("--max-prefill-tokens-while-decoding", type=int, default=None,
                       metavar="N",
                       help=f"while any request decodes, prompts longer than N take at most N "
                       f"tokens per step, together; 0 = no cap (default "
                       f"{_DEFAULTS.max_prefill_tokens_while_decoding}; offline runs on a GPU: "
                       f"no cap)")
    group.add_argument("--capacity-policy", default=None, choices=CAPACITY_POLICIES,
                       help=f"{EngineConfig.model_fields['capacity_policy'].description} "
                       f"(default {_DEFAULTS.capacity_policy})")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + output (default: the engine's)")
    group.add_argument("--num-kv-blocks", type=int, default=None,
                       help="KV pool size, overrides memory sizing")
    group.add_argument("--kv-cache-dtype", default=None,
                       help=f"KV cache dtype (default {_DEFAULTS.kv_cache_dtype}: the compute dtype)")
    group.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       default=None, help="disable reuse of cached prompt prefixes")
    group.add_argument("--gpu-memory-utilization", type=float, default=None,
                       help=f"fraction of GPU memory for weights + KV cache "
                       f"(default {_DEFAULTS.gpu_memory_utilization})")
    group.add_argument("--device", default=None,
                       help="cuda, cuda:N or cpu (default: cuda if available)")
    group.add_argument("--tp", dest="tensor_parallel_size", type=int, default=None,
                       help="tensor-parallel ranks (default: the engine's; a checkpoint is "
                       "built for it)")
    group.add_argument("--pp", dest="pipeline_parallel_size", type=int, default=None,
                       help="pipeline stages (default: the engine's; a checkpoint is built for it)")


# The devices kiln runs on; anything else (tpu, mps, a typo) is refused with one line here,
# before torch.device() would raise its own list of every device type torch knows.
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device: str) -> str:
    if not _DEVICE.fullmatch(device):
        raise KilnError(f"--device {device!r} is not a device kiln runs on: use cuda, cuda:N "
                        f"(a GPU index) or cpu")
    return device


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine flags the user set, checked where the CLI can do better than the engine."""
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    names = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
             "num_kv_blocks", "kv_cache_dtype", "enable_prefix_caching",
             "gpu_memory_utilization", "device", "tensor_parallel_size", "pipeline_parallel_size",
             "max_prefill_tokens_while_decoding", "capacity_policy")
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    cap = kwargs.get("max_prefill_tokens_while_decoding")
    if cap is not None and cap < 0:
        raise KilnError(f"--max-prefill-tokens-while-decoding must be >= 0 (0: no cap); got {cap}")
    if cap == 0:
        kwargs["max_prefill_tokens_while_decoding"] = None
    return kwargs
