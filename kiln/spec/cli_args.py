"""The speculative-decoding flags of `kiln generate | chat | serve | bench`:

    --speculative ngram|draft|random   --speculative-model ENGINE
    --num-speculative-tokens K         --ngram-min N  --ngram-max N
    --no-adaptive-speculation
"""

from __future__ import annotations

import argparse

from kiln.spec.config import METHODS, SpeculativeConfig


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding")
    group.add_argument("--speculative", default=None, metavar="METHOD",
                       help=f"propose tokens for the model to verify: {', '.join(METHODS)} "
                       f"(default: off)")
    group.add_argument("--speculative-model", default=None, metavar="ENGINE",
                       help="the draft engine of --speculative draft (same tokenizer)")
    group.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                       help="most tokens proposed per step, 1-16 (default 4)")
    group.add_argument("--ngram-min", type=int, default=None,
                       help="shortest suffix n-gram looked up (default 1)")
    group.add_argument("--ngram-max", type=int, default=None,
                       help="longest suffix n-gram looked up (default 4)")
    group.add_argument("--no-adaptive-speculation", dest="adaptive_speculation",
                       action="store_false", default=True,
                       help="always propose K tokens (default: k adapts to acceptance and batch)")


def speculative_config_from_args(args: argparse.Namespace) -> SpeculativeConfig | None:
    """The validated config, or None without --speculative; KilnError (one line) for bad
    values, a flag without --speculative included."""
    method = getattr(args, "speculative", None)
    values = {
        "model": getattr(args, "speculative_model", None),
        "num_speculative_tokens": getattr(args, "num_speculative_tokens", None),
        "ngram_min": getattr(args, "ngram_min", None),
        "ngram_max": getattr(args, "ngram_max", None),
    }
    values = {name: value for name, value in values.items() if value is not None}
    if method is None:
        if values:
            from kiln.errors import KilnError

            flag = "--" + next(iter(values)).replace("_", "-")
            flag = flag.replace("--model", "--speculative-model")
            raise KilnError(f"{flag} needs --speculative ngram|draft")
        return None
    if not getattr(args, "adaptive_speculation", True):
        values["adaptive"] = False
    return SpeculativeConfig.from_dict({"method": method, **values})


def speculative_kwargs(args: argparse.Namespace) -> dict:
    """{"speculative_config": ...} for LLM(...) / LLMEngine.from_engine_dir, or {}."""
    config = speculative_config_from_args(args)
    return {} if config is None else {"speculative_config": config}
