"""Batched sampling: one row of logits per request in, one token id per request out.

    SamplingMetadata.build(rows)   once per step, on the host: per-request params → tensors
    Sampler()(logits, metadata)    on the logits' device, no host syncs

Order of processing (as vLLM):

    logits (R, V) float32
      0. token bitmask        structured outputs (kiln/structured): tokens the request's
                              grammar does not allow → -inf, in the caller's tensor
      1. repetition penalty   on prompt + output tokens (HF/CTRL: divide positive logits,
                              multiply negative ones)
      2. frequency, presence  on output tokens only (OpenAI: subtract f * count + p * [count>0])
      3. min_tokens           EOS and stop token ids → -inf while too few tokens are out
      ── greedy rows: argmax of these penalised logits
      4. temperature          logits / T (greedy rows use T = 1)
      ── logprobs: log_softmax of the logits at this point (see below)
      5. top-k, top-p, min-p  filtering, in that order, to -inf
      6. sample               exponential race: argmax(probs / Exponential(1))

Logprobs are the log_softmax of the logits after steps 1-4: penalties, min_tokens masking
and temperature, but before top-k/top-p/min-p truncation, so a top-n list still ranks
tokens the filters removed instead of showing -inf for all of them. For greedy rows that is
the log_softmax of the penalised logits (temperature is not applied). Tokens banned by
min_tokens have logprob -inf.

Fast path: a batch with nothing to do but temperature (no penalties, min_tokens bans, top-k,
top-p, min-p, logprobs or seeded random rows; not all greedy), on CUDA with the fast kernels
on (not KILN_REFERENCE_KERNELS=1), has steps 1-3 and 5 as no-ops, and fuses 4 and 6 with the
greedy argmax into one read of the logits as they are (no fp32 copy):
`kiln.kernels.sampling.sample_gumbel`, argmax(logits / T + Gumbel noise) for random rows, the
same distribution as step 6's race. Its Philox noise is keyed by a seed drawn each call from
torch's default CPU generator (no device sync; reproducible under torch.manual_seed). This is
the common serving case, where the torch path's ~8 passes over an fp32 (R, V) copy were ~10 %
of a 512-row Llama-3.1-8B decode step. Every other batch takes the steps above.

Per-request seeds: the exponential race draws one Exponential(1) per vocabulary entry. A
seeded row draws its V exponentials from its own `torch.Generator` and nothing else does,
so its tokens depend only on its seed, its logits and how many steps it has sampled, never
on the batch around it. The generator must outlive the step: the engine keeps one per
request (`RequestGenerators`) and drops it when the request finishes. Unseeded rows share
torch's default generator for the logits' device. A batch with a seeded random row never
takes the fast path, so this holds there too.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

from kiln.kernels import sampling
from kiln.kernels.ops import use_reference_kernels
from kiln.runtime.input_batch import int64_array
from kiln.runtime.messages import TokenLogprobs
from kiln.runtime.sampling_params import SamplingParams
from kiln.spec.rejection import rejection_sample
from kiln.structured.bitmask import apply_token_bitmask

# Random rows with a tiny temperature would overflow logits / T; below this they are
# sampled at this temperature, which is already argmax in all but name.
MIN_TEMPERATURE = 1e-5
# Every optional feature off: the values SamplingMetadata.build looks for.
_OFF = SamplingParams()


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded request, on the device that holds the logits."""
    generator = torch.Generator(device=device)
    # manual_seed takes a 64-bit value; map negative seeds into range deterministically.
    generator.manual_seed(seed % 2**64)
    return generator


class RequestGenerators:
    """The per-request generators of seeded requests, kept alive across steps.

    The owner of the step loop (the engine or model runner) holds one of these, calls
    `get` while building each step's rows and `drop` when a request finishes or is
    aborted. Preemption must *not* drop it: the recomputed request continues its random
    stream where it left off, so it reproduces the tokens it would have produced.
    A request fanned out into n sequences should give each its own seed (vLLM uses
    seed + index), or the n sequences come out identical.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._generators: dict[str, torch.Generator] = {}

    def get(self, request_id: str, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None:
            return None
        generator = self._generators.get(request_id)
        if generator is None:
            generator = make_generator(params.seed, self.device)
            self._generators[request_id] = generator
        return generator

    def drop(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def clear(self) -> None:
        self._generators.clear()

    def __len__(self) -> int:
        return len(self._generators)


class SamplingRow(NamedTuple):
    """One request's input to this step's sampling (host data).

    A NamedTuple rather than a frozen dataclass: just as immutable, and the runner builds
    one per request per step, where a frozen dataclass's __init__ costs twice as much.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    # Tokens generated so far (before this step's token).
    output_token_ids: Sequence[int]
    # The model's EOS id; banned by min_tokens unless params.ignore_eos.
    eos_token_id: int | None = None
    # From RequestGenerators.get: the request's own generator, or None when unseeded.
    generator: torch.Generator | None = None
    # Output tokens already sampled on the device by steps still in flight, so not yet in
    # output_token_ids. They count toward min_tokens (penalties use output_token_ids only:
    # steps with penalties are not overlapped).
    num_pending_output_tokens: int = 0


@dataclass(frozen=True)
class SamplingMetadata:
    """A step's sampling parameters as tensors on the logits' device.

    Optional tensors are None when no row in the batch uses that feature, so the sampler
    skips the work; those decisions are made on the host while building, never by reading
    a device tensor.
    """

    # (R,) float32 temperatures; 1.0 for greedy rows so dividing by it is a no-op.
    temperatures: torch.Tensor
    # (R,) bool: rows that take argmax of the penalised logits.
    greedy_mask: torch.Tensor
    # Every row / some row is greedy (an empty batch: True / False). Without greedy rows
    # the sampler skips their argmax; with only greedy rows, all random sampling.
    all_greedy: bool
    any_greedy: bool
    # (R,) int64 in [1, V]; V for rows without top-k. None when no row uses top-k.
    top_k: torch.Tensor | None
    # (R,) float32 in (0, 1]. None when no row uses top-p.
    top_p: torch.Tensor | None
    # (R,) float32 in [0, 1]. None when no row uses min-p.
    min_p: torch.Tensor | None
    # (R,) float32 each; None when no row has any penalty.
    repetition_penalties: torch.Tensor | None
    presence_penalties: torch.Tensor | None
    frequency_penalties: torch.Tensor | None
    # (R, Lp) / (R, Lo) int64 token ids padded with V (a column that is dropped). Only rows
    # with penalties carry their ids; the others are all padding. None without penalties.
    prompt_token_ids: torch.Tensor | None
    output_token_ids: torch.Tensor | None
    # (K,) int64 indices into the flattened (R * V) logits that min_tokens sets to -inf
    # (row * V + token id: index_fill_ on a flat view does not sync, unlike indexed
    # assignment of a Python scalar).
    banned_flat_indices: torch.Tensor | None
    # Row index → that row's own generator, for seeded random rows.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # Per row: top-n logprobs requested (None: no logprobs). max_num_logprobs is the
    # largest n, or None when no row wants logprobs.
    num_logprobs: list[int | None] = field(default_factory=list)
    max_num_logprobs: int | None = None
    # (R, ceil(V / 32)) int32: the tokens each row may sample (kiln/structured/bitmask.py),
    # or None when no row is constrained by a grammar.
    token_bitmask: torch.Tensor | None = None

    @classmethod
    def build(
        cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str,
        token_bitmask: torch.Tensor | None = None,
    ) -> SamplingMetadata:
        """token_bitmask: the step's host mask (pinned on CUDA), copied to `device`."""
        # This runs every step over every row. Each setting is read once into a list (a
        # comprehension over one attribute is the cheapest per-row Python there is), "does
        # any row use it?" is list.count of its off value, a C loop (most batches use no
        # optional feature, and then nothing more is done for it), and per-row arithmetic
        # is numpy. Counting _OFF's own value objects lets count() match defaulted
        # settings by identity before it compares; any equal value still counts.
        device = torch.device(device)
        num_rows = len(rows)
        params = [row.params for row in rows]
        temperatures = _float64_array([p.temperature for p in params])  # (R,)
        top_k = [p.top_k for p in params]
        uses_top_k = top_k.count(_OFF.top_k) != num_rows
        greedy = temperatures == 0  # (R,) SamplingParams.is_greedy: T = 0 or top_k = 1
        if uses_top_k and 1 in top_k:
            greedy |= np.array([k == 1 for k in top_k], dtype=bool)
        # Filters matter for random rows only: greedy rows take the argmax anyway.
        random = ~greedy  # (R,)

        host: dict[str, np.ndarray] = {}  # field name → its host array
        # Greedy rows divide by 1; tiny temperatures are raised to MIN_TEMPERATURE.
        temperatures = np.maximum(temperatures, MIN_TEMPERATURE)
        temperatures[greedy] = 1.0
        host["temperatures"] = _float32_array(temperatures)
        host["greedy_mask"] = greedy
        if uses_top_k and (np.array([k != -1 for k in top_k], dtype=bool) & random).any():
            # Clamped in Python first: top_k may be any int, past what int64 holds.
            host["top_k"] = int64_array(
                [vocab_size if k == -1 else min(k, vocab_size) for k in top_k]
            )
        top_p = [p.top_p for p in params]
        if top_p.count(_OFF.top_p) != num_rows and (_float64_array(top_p)[random] < 1).any():
            host["top_p"] = _float32_array(top_p)
        min_p = [p.min_p for p in params]
        if min_p.count(_OFF.min_p) != num_rows and (_float64_array(min_p)[random] > 0).any():
            host["min_p"] = _float32_array(min_p)

        repetition = [p.repetition_penalty for p in params]
        presence = [p.presence_penalty for p in params]
        frequency = [p.frequency_penalty for p in params]
        if (
            repetition.count(_OFF.repetition_penalty) != num_rows
            or presence.count(_OFF.presence_penalty) != num_rows
            or frequency.count(_OFF.frequency_penalty) != num_rows
        ):
            penalties = _float64_array(repetition + presence + frequency).reshape(3, num_rows)
            has_penalty = (penalties != [[1.0], [0.0], [0.0]]).any(axis=0)  # (R,)
            penalties32 = _float32_array(penalties)  # (3, R)
            host["repetition_penalties"] = penalties32[0]
            host["presence_penalties"] = penalties32[1]
            host["frequency_penalties"] = penalties32[2]
            # Rows without penalties need no counts: their ids are left out entirely.
            host["prompt_token_ids"] = _padded_ids(
                [row.prompt_token_ids for row in rows], has_penalty, vocab_size
            )
            host["output_token_ids"] = _padded_ids(
                [row.output_token_ids for row in rows], has_penalty, vocab_size
            )

        if [p.min_tokens for p in params].count(_OFF.min_tokens) != num_rows:
            banned = _min_tokens_banned_indices(rows, vocab_size)
            if banned:
                host["banned_flat_indices"] = int64_array(banned)

        generators = {}
        row_generators = [row.generator for row in rows]
        if row_generators.count(None) != num_rows:
            generators = {
                i: generator
                for i, (generator, is_random) in enumerate(zip(row_generators, random.tolist()))
                if generator is not None and is_random
            }
        num_logprobs = [p.logprobs for p in params]
        max_num_logprobs = None
        if num_logprobs.count(None) != num_rows:
            max_num_logprobs = max(n for n in num_logprobs if n is not None)

        tensors = _to_device(host, device)
        return cls(
            temperatures=tensors["temperatures"],
            greedy_mask=tensors["greedy_mask"],
            all_greedy=bool(greedy.all()),
            any_greedy=bool(greedy.any()),
            top_k=tensors.get("top_k"),
            top_p=tensors.get("top_p"),
            min_p=tensors.get("min_p"),
            repetition_penalties=tensors.get("repetition_penalties"),
            presence_penalties=tensors.get("presence_penalties"),
            frequency_penalties=tensors.get("frequency_penalties"),
            prompt_token_ids=tensors.get("prompt_token_ids"),
            output_token_ids=tensors.get("output_token_ids"),
            banned_flat_indices=tensors.get("banned_flat_indices"),
            generators=generators,
            num_logprobs=num_logprobs,
            max_num_logprobs=max_num_logprobs,
            token_bitmask=(None if token_bitmask is None
                           else token_bitmask.to(device, non_blocking=True)),
        )


def _min_tokens_banned_indices(rows: Sequence[SamplingRow], vocab_size: int) -> list[int]:
    """Flat (row * V + token) indices of the EOS and stop token ids of rows that have not
    yet generated min_tokens tokens, counting those still being sampled on the device."""
    indices: list[int] = []
    for i, row in enumerate(rows):
        num_generated = len(row.output_token_ids) + row.num_pending_output_tokens
        if num_generated >= row.params.min_tokens:
            continue
        stop_ids = set(row.params.stop_token_ids)
        if row.eos_token_id is not None and not row.params.ignore_eos:
            stop_ids.add(row.eos_token_id)
        indices += [i * vocab_size + t for t in sorted(stop_ids) if t < vocab_size]
    return indices


def _padded_ids(
    token_lists: Sequence[Sequence[int]], keep: np.ndarray, vocab_size: int
) -> np.ndarray:
    """(R, L) int64: the token ids of the rows in `keep`, each padded with V to the longest
    kept row; the other rows are all padding."""
    lengths = int64_array([len(ids) for ids in token_lists]) * keep  # (R,)
    width = int(lengths.max()) if len(lengths) else 0
    padded = np.full((len(token_lists), width), vocab_size, dtype=np.int64)
    kept_ids = [ids for ids, kept in zip(token_lists, keep.tolist()) if kept]
    # Boolean-mask assignment fills row by row, so the flat ids land in their own rows.
    padded[np.arange(width) < lengths[:, None]] = int64_array(list(chain.from_iterable(kept_ids)))
    return padded


def _float64_array(values: list[float]) -> np.ndarray:
    """As np.array(values, dtype=np.float64), for lists of Python numbers, in one C loop
    (struct); numpy converts element by element, ~3x slower at a few hundred."""
    array = np.empty(len(values), dtype=np.float64)
    struct.pack_into(f"{len(values)}d", array, 0, *values)
    return array


def _float32_array(values: np.ndarray | list[float]) -> np.ndarray:
    """Rounded to float32 as torch.tensor(values, dtype=torch.float32) does, including
    values past float32's range becoming ±inf without a warning."""
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype(np.float32)


def _to_device(host: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Host arrays → tensors on `device`. On the CPU they are wrapped as they are. On CUDA
    they go in one pinned buffer and one non-blocking copy, rather than a pinned allocation
    and a copy per field: each array sits at an 8-byte aligned offset and becomes a typed
    view of the device copy. The pinned buffer is fresh each step, from torch's caching host
    allocator, which does not hand a block out again before the copy reading it has
    finished, so a later step never overwrites data still in flight."""
    if device.type == "cpu":
        return {name: torch.from_numpy(array) for name, array in host.items()}
    return _packed_copy(host, device, pin_memory=device.type == "cuda")


def _packed_copy(
    host: dict[str, np.ndarray], device: torch.device, pin_memory: bool
) -> dict[str, torch.Tensor]:
    """All arrays in one byte buffer, one copy to `device`, one typed view per array."""
    offsets = {}
    size = 0
    for name, array in host.items():
        offsets[name] = size
        size += -(-array.nbytes // 8) * 8
    packed_host = torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory)
    packed_bytes = packed_host.numpy()
    for name, array in host.items():
        raw = np.ascontiguousarray(array).view(np.uint8).ravel()
        packed_bytes[offsets[name] : offsets[name] + raw.size] = raw
    packed = packed_host.to(device, non_blocking=True)
    return {
        name: packed[offsets[name] : offsets[name] + array.nbytes]
        .view(_TORCH_DTYPES[array.dtype.type])
        .view(array.shape)
        for name, array in host.items()
    }


_TORCH_DTYPES = {np.float32: torch.float32, np.int64: torch.int64, np.bool_: torch.bool}


@dataclass(frozen=True)
class VerifyRows:
    """Random (not greedy) requests whose rows verify proposed tokens this step: their
    tokens come from rejection sampling (kiln/spec/rejection.py) against the filtered
    target distribution at each of their logits rows, not from the per-row race."""

    # (B, K + 1) int64: each request's logits rows, padded by repeating its last one.
    logits_rows: torch.Tensor
    # (B, K) int64 proposals (padded with 0) and (B,) how many each request has.
    draft_token_ids: torch.Tensor
    num_draft: torch.Tensor
    # Flat indices into the (B * (K + 1)) output that are real rows, and the logits row each
    # one lands in.
    flat_valid: torch.Tensor
    flat_rows: torch.Tensor
    # Batch index b → request b's own generator (seeded requests).
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # (B, K, V) the proposer's distributions, or None: point masses at the proposals.
    draft_probs: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        requests: Sequence[tuple[int, Sequence[int], torch.Generator | None]],
        device: torch.device,
    ) -> VerifyRows:
        """requests: per request (its first logits row, its proposals, its generator)."""
        width = max(len(proposed) for _, proposed, _ in requests) + 1
        logits_rows, drafts, num_draft, flat_valid, flat_rows = [], [], [], [], []
        generators = {}
        for index, (first, proposed, generator) in enumerate(requests):
            count = len(proposed)
            rows = [first + min(i, count) for i in range(width)]
            logits_rows.append(rows)
            drafts.append(list(proposed) + [0] * (width - 1 - count))
            num_draft.append(count)
            flat_valid += [index * width + i for i in range(count + 1)]
            flat_rows += rows[: count + 1]
            if generator is not None:
                generators[index] = generator
        tensors = _to_device({
            "logits_rows": int64_array(list(chain.from_iterable(logits_rows))).reshape(
                len(requests), width),
            "draft_token_ids": int64_array(list(chain.from_iterable(drafts))).reshape(
                len(requests), width - 1),
            "num_draft": int64_array(num_draft),
            "flat_valid": int64_array(flat_valid),
            "flat_rows": int64_array(flat_rows),
        }, device)
        return cls(generators=generators, **tensors)


@dataclass(frozen=True)
class LogprobsTensors:
    """Logprobs of one step, still on the device (see the module docstring for which)."""

    sampled_logprobs: torch.Tensor  # (R,) float32: logprob of each row's sampled token
    top_token_ids: torch.Tensor  # (R, max_n) int64, best first
    top_logprobs: torch.Tensor  # (R, max_n) float32, descending


@dataclass(frozen=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # (R,) int64
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


class Sampler:
    """Stateless: everything per request comes in through SamplingMetadata."""

    def __call__(
        self, logits: torch.Tensor, metadata: SamplingMetadata, verify: VerifyRows | None = None
    ) -> SamplerOutput:
        if metadata.token_bitmask is not None:
            # In place: the runner's logits are dead after sampling (a graph's output buffer
            # is rewritten by its next replay), and every path below then sees the mask.
            apply_token_bitmask(logits, metadata.token_bitmask)
        if verify is None and _fast_path_eligible(logits, metadata):
            # From the CPU generator: reading it back costs no device sync.
            seed = int(torch.randint(0, 2**62, (1,)).item())
            sampled = sampling.sample_gumbel(
                logits, metadata.temperatures, metadata.greedy_mask, seed
            )  # (R,)
            return SamplerOutput(sampled_token_ids=sampled, logprobs=None)
        # The caller's logits stay untouched (but for a token bitmask, above): processing below
        # is in place on a copy. An all-greedy batch without penalties or min_tokens changes
        # nothing in place (it skips the division by T = 1 too), so it reads the logits as
        # they are.
        in_place = (
            not metadata.all_greedy
            or metadata.repetition_penalties is not None
            or metadata.banned_flat_indices is not None
        )
        if not in_place and metadata.max_num_logprobs is None:
            # Argmax in the logits' own dtype (the graphs' bf16): widening to float32 is
            # exact, so the token is the same without a (R, V) float32 copy.
            return SamplerOutput(sampled_token_ids=logits.argmax(dim=-1), logprobs=None)
        logits = logits.to(torch.float32, copy=in_place)  # (R, V)
        self._apply_penalties(logits, metadata)
        if metadata.banned_flat_indices is not None:
            logits.view(-1).index_fill_(0, metadata.banned_flat_indices, float("-inf"))
        # Greedy rows' tokens, before the division by T below. A batch of random rows only
        # skips this (an empty batch counts as all greedy).
        greedy_token_ids = None
        if metadata.all_greedy or metadata.any_greedy:
            greedy_token_ids = logits.argmax(dim=-1)  # (R,)

        if not metadata.all_greedy:
            logits.div_(metadata.temperatures.unsqueeze(1))  # greedy rows divide by 1
        logprobs = None
        if metadata.max_num_logprobs is not None:
            logprobs = torch.log_softmax(logits, dim=-1)  # (R, V)

        if metadata.all_greedy:
            sampled = greedy_token_ids
        else:
            probs = self._filtered_probs(logits, metadata)  # (R, V)
            sampled = self._race(probs, metadata)  # (R,)
            if metadata.any_greedy:
                sampled = torch.where(metadata.greedy_mask, greedy_token_ids, sampled)
            if verify is not None:
                sampled = self._verify(probs, sampled, verify)

        if logprobs is None:
            return SamplerOutput(sampled_token_ids=sampled, logprobs=None)
        top_logprobs, top_token_ids = logprobs.topk(metadata.max_num_logprobs, dim=-1)
        # clamp: a verify row past its request's last token holds NO_TOKEN (dropped later).
        sampled_logprobs = logprobs.gather(1, sampled.clamp(min=0).unsqueeze(1)).squeeze(1)
        return SamplerOutput(
            sampled_token_ids=sampled,
            logprobs=LogprobsTensors(sampled_logprobs, top_token_ids, top_logprobs),
        )

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
        if metadata.repetition_penalties is None:
            return
        num_rows, vocab_size = logits.shape
        output_counts = _bin_counts(metadata.output_token_ids, num_rows, vocab_size)  # (R, V)
        prompt_counts = _bin_counts(metadata.prompt_token_ids, num_rows, vocab_size)  # (R, V)
        seen = (prompt_counts > 0) | (output_counts > 0)  # (R, V)

        penalty = metadata.repetition_penalties.unsqueeze(1).expand_as(logits)  # (R, V)
        penalty = torch.where(seen, penalty, torch.ones_like(penalty))
        # Dividing a positive logit and multiplying a negative one both make the token less
        # likely; a plain division would make negative logits *more* likely.
        logits.copy_(torch.where(logits > 0, logits / penalty, logits * penalty))

        logits.sub_(metadata.frequency_penalties.unsqueeze(1) * output_counts)
        logits.sub_(metadata.presence_penalties.unsqueeze(1) * (output_counts > 0))

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """(R, V) the distribution each random row samples from: top-k, top-p, min-p, then
        softmax (min-p's cut is not renormalised: the race below does not need it).
        Modifies logits in place."""
        if metadata.top_k is not None or metadata.top_p is not None:
            _apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
        probs = torch.softmax(logits, dim=-1)  # (R, V)
        if metadata.min_p is not None:
            max_probs = probs.amax(dim=-1, keepdim=True)  # (R, 1)
            too_small = probs < metadata.min_p.unsqueeze(1) * max_probs  # (R, V)
            probs = probs.masked_fill(too_small, 0.0)  # no renormalisation needed: see below
        return probs

    @staticmethod
    def _verify(probs: torch.Tensor, sampled: torch.Tensor, verify: VerifyRows) -> torch.Tensor:
        """The verify requests' logits rows get rejection sampling's tokens: accepted
        proposals, then the recovered or bonus token, then NO_TOKEN (-1)."""
        target = probs[verify.logits_rows]  # (B, K + 1, V)
        target = target / target.sum(dim=-1, keepdim=True)  # min-p leaves it unnormalised
        emitted = rejection_sample(target, verify.draft_token_ids, verify.num_draft,
                                   verify.draft_probs, verify.generators)  # (B, K + 1)
        sampled = sampled.clone()
        sampled[verify.flat_rows] = emitted.view(-1)[verify.flat_valid]
        return sampled

    @staticmethod
    def _race(probs: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Sample every row of (R, V) probabilities; the caller keeps greedy rows' argmax."""
        # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability
        # p_i / sum(p), so unnormalised probabilities are fine, and it needs no cumsum or
        # host sync (unlike torch.multinomial).
        exponentials = torch.empty_like(probs)  # (R, V)
        exponentials.exponential_()
        for row, generator in metadata.generators.items():
            exponentials[row].exponential_(generator=generator)
        # An exactly-zero draw would turn a filtered token's 0/0 into NaN, which argmax picks.
        exponentials.clamp_min_(torch.finfo(torch.float32).tiny)
        return (probs / exponentials).argmax(dim=-1)  # (R,)


def _fast_path_eligible(logits: torch.Tensor, metadata: SamplingMetadata) -> bool:
    """Whether this batch takes the one-pass Gumbel-max kernel (see the module docstring)."""
    return (
        _fast_kernels(logits)
        and logits.dim() == 2
        and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and logits.stride(-1) == 1
        and _temperature_only(metadata)
    )


def _fast_kernels(logits: torch.Tensor) -> bool:
    # As kiln.kernels.ops: Triton on CUDA tensors, unless the references are forced.
    return logits.is_cuda and not use_reference_kernels()


def _temperature_only(metadata: SamplingMetadata) -> bool:
    """Some random row, and nothing to apply but temperature: no penalties (presence and
    frequency come with repetition), no min_tokens bans, no top-k/top-p/min-p, no logprobs,
    and no seeded random row (those keep their own generators' streams). An all-greedy batch
    already reads the logits once (argmax, no copy) on the torch path."""
    return (
        not metadata.all_greedy
        and metadata.repetition_penalties is None
        and metadata.banned_flat_indices is None
        and metadata.top_k is None
        and metadata.top_p is None
        and metadata.min_p is None
        and metadata.max_num_logprobs is None
        and not metadata.generators
    )


def _bin_counts(token_ids: torch.Tensor, num_rows: int, vocab_size: int) -> torch.Tensor:
    """(R, L) padded token ids → (R, V) counts; the padding id V lands in a dropped column."""
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]  # (R, V)


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> None:
    """Set logits outside each row's top-k and nucleus to -inf, in place. One ascending sort
    serves both; thresholds are gathered per row, so no per-row host control flow."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)  # (R, V) each
    vocab_size = logits.shape[1]
    if top_k is not None:
        # The k-th largest logit is at ascending position V - k; ties with it are kept.
        kth_largest = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))  # (R, 1)
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        sorted_probs = sorted_logits.softmax(dim=-1)  # (R, V) ascending
        cumulative = sorted_probs.cumsum(dim=-1)  # (R, V)
        # Drop a token when it and everything below it hold <= 1 - p of the mass: what is
        # left is the smallest top set holding >= p. The top token always stays.
        drop = cumulative <= (1 - top_p).unsqueeze(1)  # (R, V)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    logits.scatter_(1, sorted_idx, sorted_logits)


def to_token_logprobs(
    sampled_token_ids: list[int],
    logprobs: LogprobsTensors | None,
    num_logprobs: Sequence[int | None],
) -> list[TokenLogprobs | None]:
    """Device tensors → one TokenLogprobs per row (None for rows that did not ask).

    Copies to the host once (the step's single sync point for logprobs). Logprobs may be
    -inf (tokens banned by min_tokens); JSON encoders need to map that themselves.
    """
    if logprobs is None:
        return [None] * len(sampled_token_ids)
    sampled = logprobs.sampled_logprobs.tolist()
    top_ids = logprobs.top_token_ids.tolist()
    top_values = logprobs.top_logprobs.tolist()
    records: list[TokenLogprobs | None] = []
    for row, n in enumerate(num_logprobs):
        if n is None:
            records.append(None)
            continue
        top = list(zip(top_ids[row][:n], top_values[row][:n]))
        records.append(TokenLogprobs(sampled_token_ids[row], sampled[row], top))
    return records
