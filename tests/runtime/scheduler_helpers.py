"""Drivers for scheduler tests: a scheduler whose step messages are also applied to the
runner's view of the requests, fabricated requests, and a fabricated model."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from kiln.runtime.input_batch import BatchRow
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.messages import PLACEHOLDER_TOKEN_ID, ModelRunnerOutput, SchedulerOutput
from kiln.runtime.request import Request
from kiln.runtime.runner_requests import RunnerRequests
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler, SchedulerConfig

EOS = 2
BLOCK_SIZE = 4


class MirroredScheduler(Scheduler):
    """A Scheduler whose every step message is also applied to the model runner's own view
    of the requests (RunnerRequests), as the runner does, and checked against the
    scheduler's truth: the plain-data diffs (new requests, committed tokens, block ids) must
    rebuild each scheduled request's tokens and block table exactly. `rows` holds the last
    step's batch rows by request id."""

    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager | None = None):
        super().__init__(config, kv_cache_manager)
        self.runner_view = RunnerRequests()
        self.rows: dict[str, BatchRow] = {}
        self.row_history: list[dict[str, BatchRow]] = []

    def schedule(self) -> SchedulerOutput:
        out = super().schedule()
        rows = self.runner_view.apply(out)
        self.rows = {row.request_id: row for row in rows}
        self.row_history.append(self.rows)
        for chunk, row in zip(out.scheduled, rows):
            request = self.get_request(chunk.request_id)
            assert row.block_ids == request.block_ids
            assert len(row.token_ids) == chunk.num_scheduled_tokens
            spec = list(chunk.spec_token_ids)
            tokens = row.token_ids[: len(row.token_ids) - len(spec)]
            assert row.token_ids[len(tokens):] == spec
            known = [t for t in tokens if t != PLACEHOLDER_TOKEN_ID]
            # Placeholders only ever stand for the tokens at the end of a row.
            assert tokens[: len(known)] == known
            start = chunk.num_computed_tokens
            assert request.all_token_ids[start : start + len(known)] == known
        return out


def make_scheduler(**overrides: object) -> Scheduler:
    settings_ = dict(
        num_kv_blocks=65,
        block_size=BLOCK_SIZE,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=128,
    )
    settings_.update(overrides)
    return MirroredScheduler(SchedulerConfig(**settings_))


def make_request(request_id: str, prompt: list[int], **params: object) -> Request:
    params.setdefault("max_tokens", 4)
    return Request(request_id, list(prompt), SamplingParams(**params), eos_token_id=EOS)


def token_for(request_id: str, position: int) -> int:
    """The fabricated model: the token sampled at `position` depends only on the request and
    the position, so a recomputed request must produce the same output. Never EOS."""
    digest = hashlib.sha256(f"{request_id}/{position}".encode()).digest()
    return 10 + digest[0]


def step(
    scheduler: Scheduler, sample: Callable[[str, int], int] = token_for
) -> tuple[SchedulerOutput, list[Request]]:
    out = scheduler.schedule()
    sampled = {}
    for chunk in out.scheduled:
        if chunk.samples:
            position = chunk.num_computed_tokens + chunk.num_scheduled_tokens
            sampled[chunk.request_id] = [sample(chunk.request_id, position)]
    changed = scheduler.update(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return out, changed
