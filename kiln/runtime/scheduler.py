"""The token-budget scheduler: which requests compute how many tokens in the next step.

There are no prefill and decode phases. Each request has `num_tokens` (prompt + output) and
`num_computed_tokens` (those with KV in the cache); a step gives it some of the difference:

    running requests, oldest first    each gets min(its uncomputed tokens, budget left):
                                      1 for a decode, the next chunk of a chunked prefill
    then waiting requests, FCFS       prefix-cache hits first, then the whole rest of the
                                      prompt or as much of it as the budget allows

The step's budget is `max_num_batched_tokens`; at most `max_num_seqs` requests run at once.
When a running request needs a block and none is left, the newest running request is
preempted by recompute: its blocks are freed, its `num_computed_tokens` goes back to 0, and
it waits at the front of the queue; its output tokens are kept and recomputed with the prompt.
A request that could not fit even with the whole cache to itself is rejected by
`add_request`, so the oldest running request can always grow and preemption cannot loop.

That is the "max-utilization" capacity policy (vLLM's): admit while blocks are free, preempt
when they run out. "guaranteed-no-evict" (TensorRT-LLM's default) admits a request only
while every running request, and it, can reach its longest length (prompt + max_tokens, or
max_model_len) in the cache at once: no preemption ever, fewer requests at a time. Offline
runs whose requests grow in lockstep past the cache (2048/2048 at 1,500 requests) preempt
hundreds of times under the first and recompute every preempted request's KV.

The engine drives it, one call of each per step and in this order:

    out = scheduler.schedule()
    res = runner.execute(out)
    changed = scheduler.update(out, res)        # new tokens, stop checks, blocks freed

or, with overlapped steps (the GPU computes step N while the host schedules step N+1), with
the next step scheduled before the previous one's results are in:

    out1 = schedule(); launch(out1)
    out2 = schedule(); launch(out2); update(out1, collect(out1))
    out3 = schedule(); launch(out3); update(out2, collect(out2))  ...

`schedule()` advances `num_computed_tokens` as it hands out a chunk and counts the token
that chunk will sample in `num_pending_tokens`; a request whose last token is still pending
is scheduled again, and the runner puts a placeholder there that it fills on the device
from the previous step's sampled ids. The runner knows requests only through the step
messages (messages.py): `schedule()` sends each one's prompt once and then diffs (output
tokens committed, blocks added) in its rows.

Multi-token rows: a request in decode whose `spec_token_ids` a drafter has filled is
scheduled as [last token, *spec_token_ids] (as many as the budget, max_tokens and
max_model_len leave room for) with logits after each; `update` takes the 1..k+1 tokens the
runner accepted and rolls back `num_computed_tokens` and the blocks of the rejected ones. A request that stops on that pending token has then computed one token
too many: `update` drops it. A request whose pending tokens already reach max_tokens or
max_model_len is not scheduled again.

A finished or aborted request stays visible to `get_request` (and `finish_request`) until
the next `schedule()`, which reports its id to the runner in `finished_request_ids` and then
forgets it: the scheduler keeps no per-request state past that.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from kiln.config import (
    CAPACITY_POLICIES,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING,
)
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.messages import (
    ModelRunnerOutput,
    NewRequest,
    ScheduledRequest,
    SchedulerOutput,
)
from kiln.runtime.request import Request, RequestStatus

# See SchedulerConfig.max_prefill_tokens_while_decoding.
# A decode row's logits: at its one token. Shared, not built per row per step.
_DECODE_LOGITS_OFFSETS = (0,)


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits of the scheduler and the size of the KV cache it hands out."""

    # KV blocks the runner allocated, including the reserved null block 0.
    num_kv_blocks: int
    # Token slots per KV block.
    block_size: int = DEFAULT_BLOCK_SIZE
    # Requests running at once (the largest batch of sequences).
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    # Tokens computed in one step, over all requests (the step's token budget).
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    # Longest sequence, prompt plus output, that a request may reach.
    max_model_len: int = 4096
    # Share the KV of equal full-block prefixes between requests.
    enable_prefix_caching: bool = True
    # While any running request decodes, the chunks of prompts longer than this (new prompts
    # and running chunked prefills together) take at most this many tokens per step, so a
    # long prompt delays the decoding streams by about one step's worth of work instead of
    # a whole max_num_batched_tokens step (on the H200, 8B bf16: a 512-token chunk is
    # ~8 ms, an 8,192-token step ~240 ms). Prompts of at most this many tokens go in whole,
    # within the step's budget. None: no cap (the step's budget alone). With nothing
    # decoding a prompt takes the whole budget: its TTFT is all that is waited on.
    max_prefill_tokens_while_decoding: int | None = DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING
    # When a waiting request may start: one of CAPACITY_POLICIES (the module docstring).
    capacity_policy: str = CAPACITY_POLICIES[0]

    def __post_init__(self) -> None:
        minimums = {
            "num_kv_blocks": 2,  # the null block and at least one usable block
            "block_size": 1,
            "max_num_seqs": 1,
            "max_num_batched_tokens": 1,
            "max_model_len": 1,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        cap = self.max_prefill_tokens_while_decoding
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"max_prefill_tokens_while_decoding must be an int >= 1 or None, "
                             f"got {cap!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}"
            )
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise ValueError(f"capacity_policy must be one of {', '.join(CAPACITY_POLICIES)}, "
                             f"got {self.capacity_policy!r}")


class Scheduler:
    """Owns the waiting queue and the running list; decides each step's batch.

    One `Request` is one sequence: a SamplingParams with n > 1 is fanned out into n requests
    by the engine before they reach `add_request`.
    """

    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager | None = None):
        if kv_cache_manager is None:
            kv_cache_manager = KVCacheManager(
                config.num_kv_blocks, config.block_size, config.enable_prefix_caching
            )
        elif (kv_cache_manager.num_blocks, kv_cache_manager.block_size) != (
            config.num_kv_blocks,
            config.block_size,
        ):
            raise ValueError(
                f"kv_cache_manager has num_blocks={kv_cache_manager.num_blocks}, "
                f"block_size={kv_cache_manager.block_size} but the config says "
                f"num_kv_blocks={config.num_kv_blocks}, block_size={config.block_size}"
            )
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        # Every live request, plus finished ones until their id has gone to the runner.
        self._requests: dict[str, Request] = {}
        # WAITING and PREEMPTED requests, in the order they will be admitted.
        self._waiting: deque[Request] = deque()
        # RUNNING requests, oldest admission first: preemption takes from the end.
        self._running: list[Request] = []
        # Finished or aborted since the last schedule(); reported to the runner there.
        self._finished_request_ids: list[str] = []
        # The engine's speculative-decoding counts when it speculates (read by /metrics).
        self.speculation_stats = None

    # ---- queries ----------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def running_requests(self) -> list[Request]:
        """The running requests, oldest first (the speculator proposes for them). The
        scheduler's own list: read it, do not change it."""
        return self._running

    @property
    def num_waiting(self) -> int:
        """Waiting requests, preempted ones included."""
        return len(self._waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running)

    def has_finished_requests(self) -> bool:
        """True while some finished request's id has not yet gone out in a SchedulerOutput
        (the runner may hold state for it: keep stepping until this is False too)."""
        return bool(self._finished_request_ids)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # ---- requests in and out ----------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request, or raise ValueError (with the numbers) if it can never run."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.block_ids:
            raise ValueError(
                f"request {request.request_id!r} must be new (status waiting, no blocks), "
                f"got status {request.status.value} with {len(request.block_ids)} blocks"
            )
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        max_len = self.config.max_model_len
        if request.num_prompt_tokens >= max_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt of {request.num_prompt_tokens} tokens "
                f"leaves no room to generate within max_model_len {max_len}"
            )
        max_num_tokens = self._max_num_tokens(request)
        max_tokens = max_num_tokens - request.num_prompt_tokens  # unset: up to max_model_len
        if max_num_tokens > max_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt of {request.num_prompt_tokens} tokens "
                f"+ max_tokens {max_tokens} = {max_num_tokens} exceeds max_model_len {max_len}"
            )
        blocks_needed = self._max_num_blocks(request)
        blocks_total = self.kv_cache_manager.num_usable_blocks
        if blocks_needed > blocks_total:
            raise ValueError(
                f"request {request.request_id!r}: prompt of {request.num_prompt_tokens} tokens "
                f"+ max_tokens {max_tokens} needs {blocks_needed} KV blocks of "
                f"{self.config.block_size} tokens, but the whole cache has {blocks_total}"
            )
        self._requests[request.request_id] = request
        self._waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        """Abort a waiting, preempted or running request and free its blocks now.

        Returns False (and does nothing) for an unknown or already finished request: a client
        disconnect can race with the request's own finish.
        """
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> bool:
        """End a request from outside the scheduler (a stop string the detokenizer found, an
        abort) and free its blocks now.

        A request that already finished in the last `update` (say by length on the same token
        whose text completed the stop string) is relabelled with the new status and
        stop_reason unless it was aborted. Returns False for an unknown or aborted request.
        """
        if not status.is_finished:
            raise ValueError(f"finish_request needs a finished status, got {status.value}")
        request = self._requests.get(request_id)
        if request is None or request.status is RequestStatus.FINISHED_ABORTED:
            return False
        if request.is_finished:
            if status is RequestStatus.FINISHED_ABORTED:
                return False  # it ended on its own first: nothing to abort
            request.status = status
            request.stop_reason = stop_reason
            return True
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self._finish(request, status, stop_reason)
        return True

    # ---- one step ---------------------------------------------------------------------

    def schedule(
        self, *, skip_request_ids: Collection[str] = (), max_rows: int | None = None
    ) -> SchedulerOutput:
        """Pick this step's requests and token counts, allocating their KV blocks.

        Pipeline micro-batches (the engine at pp > 1): `skip_request_ids`, the requests of
        the steps still in flight, get no row (a request is in one micro-batch at a time),
        and the step takes at most `max_rows` requests (the live ones spread over the
        stages). Preemption may still take a skipped request's blocks: every stage runs
        the steps in order, so the step in flight is done with them on each stage before a
        later step's rows write there, and update() treats it as a request preempted while
        its token was in flight."""
        now = time.monotonic()
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        new_requests: list[NewRequest] = []
        preempted: list[Request] = []
        prefill_budget = self._prefill_budget(budget)
        max_rows = self.config.max_num_seqs if max_rows is None else max_rows

        index = 0
        while index < len(self._running) and budget > 0 and len(scheduled) < max_rows:
            request = self._running[index]
            if request.request_id in skip_request_ids:
                index += 1
                continue
            num_new_tokens = min(
                request.num_tokens + request.num_pending_tokens - request.num_computed_tokens,
                budget,
            )
            long_prefill = self._is_long_prefill(
                request.num_tokens + request.num_pending_tokens - request.num_computed_tokens)
            if long_prefill:  # a long prompt's chunk (or recompute): the shared prefill cap
                num_new_tokens = min(num_new_tokens, prefill_budget)
            if num_new_tokens <= 0 or self._reaches_limit_when_pending_arrive(request):
                index += 1  # only waiting for its pending token (overlapped steps)
                continue
            num_spec_tokens = self._num_spec_tokens_to_verify(request, num_new_tokens, budget)
            num_new_tokens += num_spec_tokens
            while not self.kv_cache_manager.allocate_slots(request, num_new_tokens):
                # Out of blocks: the newest running request gives its blocks back.
                victim = self._running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                if long_prefill and not num_spec_tokens:
                    prefill_budget -= num_new_tokens
                scheduled.append(self._schedule_chunk(request, num_new_tokens, num_spec_tokens))
                budget -= num_new_tokens
                index += 1

        # guaranteed-no-evict: the blocks the running requests may yet need, all told.
        reserved_blocks = (sum(map(self._max_num_blocks, self._running))
                           if self._waiting and self._reserves else 0)
        # Admitting new work right after a preemption would only take the blocks back.
        while self._waiting and budget > 0 and not preempted:
            if len(self._running) >= self.config.max_num_seqs or len(scheduled) >= max_rows:
                break
            request = self._waiting[0]
            if request.num_pending_tokens or request.request_id in skip_request_ids:
                # Preempted while its last sampled token (or chunk) is in flight: its token
                # history is incomplete until the next update().
                break
            computed_blocks, num_cached_tokens = self.kv_cache_manager.get_computed_blocks(
                request
            )
            long_prefill = self._is_long_prefill(request.num_tokens - num_cached_tokens)
            num_new_tokens = min(request.num_tokens - num_cached_tokens, budget,
                                 prefill_budget if long_prefill else budget)
            if num_new_tokens <= 0:
                break
            if self._reserves:
                reserved_blocks += self._max_num_blocks(request)
                if reserved_blocks > self.kv_cache_manager.num_usable_blocks:
                    break  # strict FCFS, as below
            if self._running and (
                self.kv_cache_manager.num_free_blocks
                - self.kv_cache_manager.num_free_blocks_taken(request, num_new_tokens, computed_blocks)
                < self._admission_watermark()
            ):
                # Strict FCFS: later requests wait too, so a large one is not starved.
                break
            if not self.kv_cache_manager.allocate_slots(request, num_new_tokens, computed_blocks):
                break
            self._waiting.popleft()
            if request.status is RequestStatus.WAITING:  # not a preempted one: the runner
                new_requests.append(                    # has never seen it
                    NewRequest(request.request_id, request.prompt_token_ids,
                               request.sampling_params, request.eos_token_id)
                )
            request.num_computed_tokens = num_cached_tokens
            request.status = RequestStatus.RUNNING
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
                request.metrics.num_cached_prompt_tokens = min(
                    num_cached_tokens, request.num_prompt_tokens
                )
            self._running.append(request)
            scheduled.append(self._schedule_chunk(request, num_new_tokens))
            budget -= num_new_tokens
            if long_prefill:
                prefill_budget -= num_new_tokens

        finished_request_ids = self._finished_request_ids
        self._finished_request_ids = []
        for request_id in finished_request_ids:
            del self._requests[request_id]
        return SchedulerOutput(
            scheduled=scheduled,
            new_requests=new_requests,
            preempted_request_ids=[r.request_id for r in preempted],
            finished_request_ids=finished_request_ids,
        )

    def update(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[Request]:
        """Apply one step's results: advance computed tokens, append sampled tokens, run the
        stop checks, free finished requests' blocks.

        Returns the requests that got new tokens or finished, in batch order. A request
        aborted between schedule() and update() is skipped.
        """
        now = time.monotonic()
        changed: list[Request] = []
        for chunk in scheduler_output.scheduled:
            request = self._requests.get(chunk.request_id)
            if request is None or request.is_finished:
                # Aborted, or stopped on the token before this one (overlapped steps).
                continue
            if chunk.logits_offsets:
                sampled = model_runner_output.sampled_token_ids.get(chunk.request_id)
                if not sampled:
                    raise ValueError(
                        f"request {chunk.request_id!r} was scheduled to sample, but the runner "
                        f"returned no sampled token for it"
                    )
                request.num_pending_tokens -= 1
                if chunk.spec_token_ids:
                    self._roll_back_rejected(request, chunk, len(sampled))
                for token_id in sampled:
                    request.output_token_ids.append(token_id)
                    if self._check_stop(request):
                        # Tokens after the stop (speculative decoding) are dropped.
                        break
                request.metrics.num_output_tokens = request.num_output_tokens
                if request.metrics.first_token_time is None:
                    request.metrics.first_token_time = now
                changed.append(request)
            if request.is_finished:
                if request in self._running:
                    self._running.remove(request)
                else:  # preempted while its token was in flight
                    self._waiting.remove(request)
                self._free_finished(request, now)
            elif request.status is RequestStatus.RUNNING:
                # After the append: blocks up to num_computed_tokens may hold the token that
                # was a placeholder until now.
                self.kv_cache_manager.cache_full_blocks(request)
        return changed

    # ---- helpers ----------------------------------------------------------------------

    def _is_long_prefill(self, num_prompt_tokens_left: int) -> bool:
        """A prompt with more tokens left than the cap: its chunks share the cap while others
        decode. Shorter prompts go in whole (within the step's budget): each is at most one
        cap's worth of work, and holding them back starves the batch (offline 128/128 on
        the H200 lost 29 % of its throughput when every prompt shared the cap)."""
        cap = self.config.max_prefill_tokens_while_decoding
        return cap is not None and num_prompt_tokens_left > cap

    def _prefill_budget(self, budget: int) -> int:
        """Prompt tokens this step may take: the whole budget, or the cap while any running
        request decodes (takes one token; found among the oldest, so the scan stops early)."""
        cap = self.config.max_prefill_tokens_while_decoding
        if cap is None or cap >= budget:
            return budget
        for request in self._running:
            if request.num_tokens + request.num_pending_tokens - request.num_computed_tokens <= 1:
                return cap
        return budget

    def _schedule_chunk(
        self, request: Request, num_new_tokens: int, num_spec_tokens: int = 0
    ) -> ScheduledRequest:
        """The step message for one request: its row, and what the runner has not heard of
        it yet (output tokens committed, blocks added since its last row)."""
        start = request.num_computed_tokens
        end = start + num_new_tokens
        # The row samples when it reaches the end of the tokens known or in flight; the
        # speculative tokens after that end are verified by sampling after each of them.
        samples = end - num_spec_tokens == request.num_tokens + request.num_pending_tokens
        request.num_computed_tokens = end
        if samples:
            request.num_pending_tokens += 1
        # Empty diffs are the shared () (see ScheduledRequest on allocations).
        outputs = request.output_token_ids
        num_synced = request.num_synced_output_tokens
        new_token_ids = outputs[num_synced:] if num_synced < len(outputs) else ()
        request.num_synced_output_tokens = len(outputs)
        block_ids = request.block_ids
        blocks_start = request.num_synced_blocks
        new_block_ids = block_ids[blocks_start:] if blocks_start < len(block_ids) else ()
        request.num_synced_blocks = len(block_ids)
        spec_token_ids = ()
        if request.spec_token_ids:
            spec_token_ids = request.spec_token_ids[:num_spec_tokens]
            request.spec_token_ids = []
        if not samples:
            logits_offsets = ()
        elif num_spec_tokens:
            logits_offsets = tuple(range(num_new_tokens - 1 - num_spec_tokens, num_new_tokens))
        elif num_new_tokens == 1:
            logits_offsets = _DECODE_LOGITS_OFFSETS
        else:
            logits_offsets = (num_new_tokens - 1,)
        return ScheduledRequest(
            request.request_id, start, num_new_tokens, new_token_ids,
            blocks_start, new_block_ids, spec_token_ids, logits_offsets,
        )

    def _num_spec_tokens_to_verify(
        self, request: Request, num_new_tokens: int, budget: int
    ) -> int:
        """How many of the request's proposed tokens its next row verifies: only a decode
        row (its last known token uncomputed, nothing in flight) takes them, and no more
        than the token budget, max_tokens and max_model_len leave room for (verifying k
        tokens can add k + 1)."""
        proposed = request.spec_token_ids
        if not proposed:
            return 0
        if num_new_tokens != 1 or request.num_pending_tokens:
            request.spec_token_ids = []  # stale: they continue tokens not known yet
            return 0
        room = min(len(proposed), budget - 1,
                   self.config.max_model_len - request.num_tokens - 1)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens - 1)
        return max(0, room)

    def _roll_back_rejected(
        self, request: Request, chunk: ScheduledRequest, num_sampled: int
    ) -> None:
        """A verify row computed KV for 1 + k tokens; the runner accepted num_sampled - 1
        of the k. The rejected ones' KV is not the request's: num_computed_tokens steps back
        over them and blocks that held only them are freed (the runner hears of the shorter
        table in the request's next row)."""
        num_rejected = len(chunk.spec_token_ids) + 1 - num_sampled
        if not 0 <= num_rejected <= len(chunk.spec_token_ids):
            raise ValueError(
                f"request {chunk.request_id!r} verified {len(chunk.spec_token_ids)} "
                f"speculative tokens, but the runner returned {num_sampled} tokens "
                f"(1 to {len(chunk.spec_token_ids) + 1} expected)"
            )
        if num_rejected:
            request.num_computed_tokens -= num_rejected
            self.kv_cache_manager.trim(request, request.num_computed_tokens)
            request.num_synced_blocks = min(request.num_synced_blocks, len(request.block_ids))

    @property
    def _reserves(self) -> bool:
        return self.config.capacity_policy == "guaranteed-no-evict"

    def _max_num_tokens(self, request: Request) -> int:
        """The longest the request may grow: prompt + max_tokens, or max_model_len when
        max_tokens is unset."""
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is None:
            return self.config.max_model_len
        return request.num_prompt_tokens + max_tokens

    def _max_num_blocks(self, request: Request) -> int:
        """KV blocks the request holds at its longest; its last sampled token ends it before
        that token's KV is ever computed."""
        return self.kv_cache_manager.num_blocks_for(self._max_num_tokens(request) - 1)

    def _admission_watermark(self) -> int:
        """Free blocks a new request must leave behind while others run: one per running
        request (each can grow a block before anyone is preempted) and at least 1 % of the
        cache. Without it, a request preempted for lack of blocks is readmitted as soon as
        its own freed blocks appear, takes them back, and is preempted again a step later:
        recompute churn (the 2048/2048 benchmark's eager steps took 65 s of GPU time for 1 M
        prompt tokens whose prefill needs ~20 s)."""
        return max(len(self._running), self.kv_cache_manager.num_usable_blocks // 100)

    def _reaches_limit_when_pending_arrive(self, request: Request) -> bool:
        """True when the request's pending tokens will end it by length, so scheduling it
        again would compute a token past max_tokens or max_model_len."""
        if not request.num_pending_tokens:
            return False
        num_outputs = request.num_output_tokens + request.num_pending_tokens
        max_tokens = request.sampling_params.max_tokens
        return (max_tokens is not None and num_outputs >= max_tokens) or (
            request.num_tokens + request.num_pending_tokens >= self.config.max_model_len
        )

    def _check_stop(self, request: Request) -> bool:
        """Set the finished status of a request whose last token ends it."""
        params = request.sampling_params
        last_token_id = request.output_token_ids[-1]
        # EOS and stop ids only count once min_tokens are out.
        if request.num_output_tokens >= params.min_tokens:
            if last_token_id in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = last_token_id
                return True
            if not params.ignore_eos and last_token_id == request.eos_token_id:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = None  # OpenAI convention: None means EOS
                return True
        max_tokens = params.max_tokens
        if (max_tokens is not None and request.num_output_tokens >= max_tokens) or (
            request.num_tokens >= self.config.max_model_len
        ):
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        request.num_synced_blocks = 0  # it resumes with a whole new table
        request.status = RequestStatus.PREEMPTED
        request.metrics.num_preemptions += 1
        # Front of the queue: it was admitted before anything still waiting.
        self._waiting.appendleft(request)

    def _finish(
        self, request: Request, status: RequestStatus, stop_reason: int | str | None
    ) -> None:
        request.status = status
        request.stop_reason = stop_reason
        self._free_finished(request, time.monotonic())

    def _free_finished(self, request: Request, now: float) -> None:
        self.kv_cache_manager.free(request)
        request.metrics.finished_time = now
        self._finished_request_ids.append(request.request_id)
