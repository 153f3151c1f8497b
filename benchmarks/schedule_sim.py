"""kiln's scheduler driven by a fabricated model through an offline random-dataset run
(every request at once, fixed prompt and output lengths), on the CPU: how many steps the
run takes, which of them carry prompt tokens, and which of those the runner could replay
as a CUDA graph (decode only, or a prefill graph: ≤ PREFILL_GRAPH_MAX_TOKENS tokens,
≤ PREFILL_GRAPH_MAX_SEQS rows, decode contexts < PREFILL_GRAPH_MAX_DECODE_CONTEXT), and a
time estimate from a per-step cost model whose terms are printed beside it.

The model: KV bytes the decode rows read at --attention-tb-s, GEMM FLOPs (2 × params per
token) at --gemm-tflops, prefill attention FLOPs at --prefill-attention-tflops, plus a fixed
cost per decode-only step and per step carrying prompt tokens (--decode-step-ms,
--prompt-step-ms: fitted to the two 450-request 2048/2048 runs of BENCHMARKS.md's seventh
session, whose variable terms are equal and whose step counts this reproduces). It is
arithmetic, not a measurement: use it to compare schedules, and check a prediction on the card.
Usage:
    python benchmarks/schedule_sim.py --num-prompts 1500 --cap 512 --cap none \
        [--capacity-policy guaranteed-no-evict]"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from kiln.config import CAPACITY_POLICIES
from kiln.runtime.messages import ModelRunnerOutput
from kiln.runtime.prefill_graphs import (
    PREFILL_GRAPH_MAX_DECODE_CONTEXT,
    PREFILL_GRAPH_MAX_SEQS,
    PREFILL_GRAPH_MAX_TOKENS,
)
from kiln.runtime.request import Request
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler, SchedulerConfig

# Llama-3.1-8B: 32 layers, 8 KV heads of 128, 32 query heads; ~8.0 G parameters a token runs.
LAYERS, KV_HEADS, HEAD_DIM, HEADS, PARAMS = 32, 8, 128, 32, 8.0e9


@dataclass
class RunEstimate:
    steps: int = 0
    eager_steps: int = 0
    prompt_steps: int = 0  # steps carrying prompt tokens (graphed or not)
    preemptions: int = 0
    decode_rows: int = 0
    seconds_attention: float = 0.0
    seconds_gemm: float = 0.0
    seconds_prefill_attention: float = 0.0
    seconds_fixed: float = 0.0

    @property
    def seconds(self) -> float:
        return (self.seconds_attention + self.seconds_gemm + self.seconds_prefill_attention
                + self.seconds_fixed)


def simulate(args: argparse.Namespace, cap: int | None) -> RunEstimate:
    scheduler = Scheduler(SchedulerConfig(
        num_kv_blocks=args.num_kv_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_prefill_tokens_while_decoding=cap, capacity_policy=args.capacity_policy))
    for index in range(args.num_prompts):  # distinct prompts: no prefix-cache hits
        prompt = [1000 + index] + [7] * (args.input_len - 1)
        scheduler.add_request(Request(str(index), prompt, SamplingParams(
            max_tokens=args.output_len, ignore_eos=True), eos_token_id=2))
    kv_bytes_per_token = LAYERS * KV_HEADS * HEAD_DIM * 2 * args.kv_bytes
    estimate = RunEstimate()
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        estimate.preemptions += len(out.preempted_request_ids)
        decode = [c for c in out.scheduled if c.num_scheduled_tokens == 1]
        prompt = [c for c in out.scheduled if c.num_scheduled_tokens > 1]
        tokens = sum(c.num_scheduled_tokens for c in out.scheduled)
        prompt_tokens = tokens - len(decode)
        graphed = not prompt or (
            tokens <= PREFILL_GRAPH_MAX_TOKENS and len(out.scheduled) <= PREFILL_GRAPH_MAX_SEQS
            and all(c.num_computed_tokens < PREFILL_GRAPH_MAX_DECODE_CONTEXT for c in decode))
        estimate.steps += 1
        estimate.prompt_steps += bool(prompt)
        estimate.eager_steps += not graphed
        estimate.decode_rows += len(decode)
        context = sum(c.num_computed_tokens + 1 for c in decode)
        estimate.seconds_attention += context * kv_bytes_per_token / (args.attention_tb_s * 1e12)
        estimate.seconds_gemm += tokens * 2 * PARAMS / (args.gemm_tflops * 1e12)
        # causal attention of each chunk over its context and itself: 4·H·D FLOPs a pair
        pairs = sum(c.num_scheduled_tokens * (c.num_computed_tokens + c.num_scheduled_tokens / 2)
                    for c in prompt)
        estimate.seconds_prefill_attention += (4 * HEADS * HEAD_DIM * LAYERS * pairs
                                               / (args.prefill_attention_tflops * 1e12))
        estimate.seconds_fixed += (args.prompt_step_ms if prompt else args.decode_step_ms) / 1e3
        sampled = {c.request_id: [11] for c in out.scheduled if c.samples}
        scheduler.update(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return estimate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=1500)
    parser.add_argument("--input-len", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=2048)
    parser.add_argument("--cap", action="append", default=None,
                        help="max_prefill_tokens_while_decoding to simulate (an int or 'none'); "
                        "repeat for several (default: 512 and none)")
    parser.add_argument("--capacity-policy", default=CAPACITY_POLICIES[0],
                        choices=CAPACITY_POLICIES)
    parser.add_argument("--block-size", type=int, default=32,
                        help="tokens per KV block (an FP8 cache's default)")
    parser.add_argument("--num-kv-blocks", type=int, default=57_097,
                        help="the H200's FP8-KV pool for the fp8 8B engine at 32-token blocks "
                        "(114,195 of 16; BENCHMARKS.md)")
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--kv-bytes", type=int, default=1, help="bytes per KV element (FP8: 1)")
    parser.add_argument("--attention-tb-s", type=float, default=3.3,
                        help="FP8 decode attention's KV read rate (H200, 32-token blocks)")
    parser.add_argument("--gemm-tflops", type=float, default=1250.0)
    parser.add_argument("--prefill-attention-tflops", type=float, default=500.0)
    parser.add_argument("--decode-step-ms", type=float, default=3.1)
    parser.add_argument("--prompt-step-ms", type=float, default=28.3)
    args = parser.parse_args()
    caps = [None if cap == "none" else int(cap) for cap in (args.cap or ["512", "none"])]
    print(f"{args.num_prompts} requests {args.input_len}/{args.output_len}, "
          f"{args.num_kv_blocks} KV blocks of {args.block_size}, {args.capacity_policy}")
    for cap in caps:
        started = time.perf_counter()
        run = simulate(args, cap)
        output_tokens = args.num_prompts * args.output_len
        print(f"cap {cap}: {run.steps} steps ({run.prompt_steps} with prompt tokens, "
              f"{run.eager_steps} eager), {run.preemptions} preemptions, mean decode rows "
              f"{run.decode_rows / run.steps:.0f}; estimate {run.seconds:.1f} s = attention "
              f"{run.seconds_attention:.1f} + GEMMs {run.seconds_gemm:.1f} + prefill attention "
              f"{run.seconds_prefill_attention:.1f} + fixed {run.seconds_fixed:.1f} → "
              f"{output_tokens / run.seconds:,.0f} output tok/s "
              f"(simulated in {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
