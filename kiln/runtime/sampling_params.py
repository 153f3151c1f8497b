"""How to pick the next token and when to stop: one request's `SamplingParams`.

Names and defaults follow vLLM (and so the OpenAI API), so a client written for either works
unchanged. Every field is validated here, at construction, with a `ValueError` that names the
field, the bad value and the allowed range: the engine loop never sees a bad value.

Count and list fields are capped (RELIABILITY.md, "parameter amplification"): one request
must not be able to make the engine sample 10**9 sequences or compare 10**6 stop strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kiln.structured.params import StructuredOutputsParams

# Amplification caps. A request past any of these is rejected, not truncated.
MAX_N = 128  # parallel sequences per request
MAX_LOGPROBS = 20  # top-n logprobs per position (the OpenAI API's own limit)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
OUTPUT_KINDS = ("cumulative", "final_only")
# Seeds are fed to torch.Generator.manual_seed, which takes any 64-bit value.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1


def _check_int(name: str, value: object) -> int:
    # bool is a subclass of int; `n=True` is a client bug, not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return value


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping parameters of one request (frozen: shared by its n sequences;
    use `dataclasses.replace` to derive a changed copy, which validates again)."""

    # Independent sequences to generate for the prompt, 1..MAX_N.
    n: int = 1
    # Softmax temperature, >= 0. 0 means greedy (argmax).
    temperature: float = 1.0
    # Nucleus sampling: keep the smallest set of top tokens whose probability sum >= top_p.
    # In (0, 1]; 1 disables it.
    top_p: float = 1.0
    # Keep only the k most likely tokens. -1 (or 0, normalised to -1) disables it.
    top_k: int = -1
    # Drop tokens whose probability is below min_p * (probability of the top token).
    # In [0, 1]; 0 disables it.
    min_p: float = 0.0
    # HF/CTRL repetition penalty on prompt + output tokens: positive logits are divided by
    # it, negative ones multiplied. > 0; 1 disables it.
    repetition_penalty: float = 1.0
    # OpenAI penalties on output tokens only: logit -= presence * [count > 0]
    # + frequency * count. Each in [-2, 2]; 0 disables it.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Seed of this request's own random generator: the same seed gives the same tokens
    # whatever else is in the batch. None draws from the engine's shared generator.
    seed: int | None = None
    # Most tokens to generate, >= 1. None means "up to the model length": the engine
    # resolves it to max_model_len - num_prompt_tokens.
    max_tokens: int | None = 16
    # EOS and stop token ids are masked out until this many tokens have been generated.
    min_tokens: int = 0
    # Stop strings (a single string is normalised to a one-element list). The output is
    # cut right before the first match (after it with include_stop_str_in_output).
    stop: str | list[str] | None = None
    # Token ids that end the request as EOS does (the token is kept in output_token_ids).
    stop_token_ids: list[int] = field(default_factory=list)
    # Keep generating past EOS (benchmarks); stop_token_ids and stop strings still stop.
    ignore_eos: bool = False
    # Number of top logprobs to return per position in addition to the sampled token's own
    # logprob; None returns none, 0 returns only the sampled token's.
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Which steps report this request (as vLLM's RequestOutputKind): "cumulative", every step
    # that adds tokens (streaming); "final_only", only the step that finishes it. Offline
    # batch generation wants only the last, and at 1,024 rows building a RequestOutput per
    # request per step was a fifth of the host's time.
    output_kind: str = "cumulative"
    # Constrain the output to a JSON schema, regex, choice list or EBNF grammar (needs the
    # `structured` extra: xgrammar). None generates freely.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        n = _check_int("n", self.n)
        if not 1 <= n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {n}")

        temperature = _check_float("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        top_p = _check_float("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        top_k = _check_int("top_k", self.top_k)
        if top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {top_k}")
        min_p = _check_float("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")

        if self.seed is not None:
            seed = _check_int("seed", self.seed)
            if not MIN_SEED <= seed <= MAX_SEED:
                raise ValueError(f"seed must be in [{MIN_SEED}, {MAX_SEED}], got {seed}")
        if self.max_tokens is not None:
            max_tokens = _check_int("max_tokens", self.max_tokens)
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        min_tokens = _check_int("min_tokens", self.min_tokens)
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        if self.max_tokens is not None and min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {min_tokens}"
            )
        if self.logprobs is not None:
            logprobs = _check_int("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, "
                             f"got {self.output_kind!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise ValueError(
                "structured_outputs must be a kiln.structured.StructuredOutputsParams, "
                f"got {type(self.structured_outputs).__name__}"
            )
        if self.structured_outputs is not None and min_tokens > 0:
            # min_tokens bans EOS, which a complete grammar allows alone: no token is left.
            raise ValueError("min_tokens cannot be combined with structured_outputs: the "
                             "grammar decides where the output ends")

        # Frozen dataclass: normalised values go in through object.__setattr__.
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "top_k", -1 if top_k == 0 else top_k)
        object.__setattr__(self, "min_p", min_p)
        object.__setattr__(self, "repetition_penalty", repetition_penalty)
        object.__setattr__(self, "presence_penalty", float(self.presence_penalty))
        object.__setattr__(self, "frequency_penalty", float(self.frequency_penalty))
        object.__setattr__(self, "stop", self._normalised_stop())
        object.__setattr__(self, "stop_token_ids", self._normalised_stop_token_ids())

    def _normalised_stop(self) -> list[str]:
        stop = self.stop
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(
                f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}"
            )
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must hold only strings, got {s!r}")
            if not 1 <= len(s) <= MAX_STOP_STRING_CHARS:
                raise ValueError(
                    f"stop strings must be 1..{MAX_STOP_STRING_CHARS} characters long, "
                    f"got one of {len(s)}"
                )
        return list(stop)

    def _normalised_stop_token_ids(self) -> list[int]:
        ids = self.stop_token_ids
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of ints, got {ids!r}")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}"
            )
        for token_id in ids:
            if _check_int("stop_token_ids", token_id) < 0:
                raise ValueError(f"stop_token_ids must be >= 0, got {token_id}")
        return list(ids)

    @property
    def uses_penalties(self) -> bool:
        """True when the repetition, presence or frequency penalty changes the logits."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def is_greedy(self) -> bool:
        """True when sampling is deterministic argmax (no randomness is drawn)."""
        return self.temperature == 0 or self.top_k == 1
