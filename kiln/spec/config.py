"""`SpeculativeConfig`: which proposer, how many tokens, and when speculation backs off.

The user-facing shape is vLLM's dict:

    LLM(model, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                   "prompt_lookup_max": 4, "prompt_lookup_min": 1})
    LLM(model, speculative_config={"method": "draft", "model": "/engines/small",
                                   "num_speculative_tokens": 4})

`SpeculativeConfig.from_dict` validates it and raises KilnError with one line naming the
field and what to do; nothing is built before the whole config is valid.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from kiln.errors import KilnError

METHODS = ("ngram", "draft", "random")
MAX_SPECULATIVE_TOKENS = 16
# vLLM's names for the n-gram window, accepted beside kiln's own.
_ALIASES = {"prompt_lookup_max": "ngram_max", "prompt_lookup_min": "ngram_min",
            "draft_model": "model"}


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup), "draft" (a smaller kiln engine, `model`), or
    "random" (uniform random proposals: a benchmark of the worst case, acceptance ~0)."""

    method: str
    num_speculative_tokens: int = 4
    # The draft engine's directory (method "draft").
    model: str | None = None
    # n-gram window: the last n tokens are looked up for n = ngram_max down to ngram_min.
    ngram_max: int = 4
    ngram_min: int = 1
    # Adaptive k (adaptive.py): per-request acceptance and the batch's cost decide k; off,
    # every request proposes num_speculative_tokens whenever it can.
    adaptive: bool = True
    # Tokens per step beyond which a weight-bound decode turns compute-bound (the GPU's
    # FLOP/byte ridge for a bf16 GEMM: ~200 on an H100/H200): a verify token costs about
    # batch_size / ridge_tokens of a plain step.
    ridge_tokens: int = 256
    # A draft token's cost as a fraction of a target step (draft method; ngram costs none).
    draft_cost: float = 0.1
    # Speculation is off while this many requests (or more) run; None: no such limit.
    disable_by_batch_size: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
        if values is None or isinstance(values, SpeculativeConfig):
            return values
        if not isinstance(values, dict):
            raise KilnError(f"speculative_config must be a dict, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        normalised: dict[str, Any] = {}
        for key, value in values.items():
            name = _ALIASES.get(key, key)
            if name not in known:
                raise KilnError(
                    f"speculative_config has an unknown field {key!r}; known: "
                    f"{', '.join(sorted(known | set(_ALIASES)))}"
                )
            normalised[name] = value
        if "method" not in normalised:
            # vLLM infers a draft model from "model" alone.
            normalised["method"] = "draft" if normalised.get("model") else None
        config = cls(**normalised)
        config.validate()
        return config

    def validate(self) -> None:
        if self.method not in METHODS:
            raise KilnError(
                f"unknown speculative method {self.method!r}; use one of {', '.join(METHODS)}"
            )
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise KilnError(
                f"num_speculative_tokens must be an integer from 1 to {MAX_SPECULATIVE_TOKENS}, "
                f"got {k!r}"
            )
        if self.method == "draft" and not self.model:
            raise KilnError("speculative method 'draft' needs a draft engine: set "
                            "speculative_config['model'] (--speculative-model ENGINE)")
        if self.method != "draft" and self.model:
            raise KilnError(f"speculative_config['model'] is only used by method 'draft', "
                            f"not {self.method!r}")
        for name in ("ngram_min", "ngram_max", "ridge_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KilnError(f"speculative {name} must be an integer >= 1, got {value!r}")
        if self.ngram_min > self.ngram_max:
            raise KilnError(f"speculative ngram_min {self.ngram_min} exceeds ngram_max "
                            f"{self.ngram_max}")
        if not isinstance(self.adaptive, bool):
            raise KilnError(f"speculative adaptive must be true or false, got {self.adaptive!r}")
        if isinstance(self.draft_cost, bool) or not isinstance(self.draft_cost, (int, float)) \
                or not 0 <= self.draft_cost <= 1:
            raise KilnError(f"speculative draft_cost must be a number in [0, 1], got "
                            f"{self.draft_cost!r}")
        limit = self.disable_by_batch_size
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise KilnError(f"speculative disable_by_batch_size must be an integer >= 1, got "
                            f"{limit!r}")
