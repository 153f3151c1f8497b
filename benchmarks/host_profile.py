"""Host (CPU) cost of one engine step at a large batch, with the model stubbed out.

The model's forward returns zeros and its logits are random, so what is left is the Python
and numpy work around it: scheduling, input preparation, sampling metadata, the sampler's
op dispatch and output handling. On the CPU the sampler's ops also compute (a GPU does that
part in production); the vocabulary is tiny (128) to keep that small.

Two measurements, both with time.perf_counter (cProfile inflates Python-heavy code):

    loop    the engine loop over --num-requests requests of 128 prompt / 128 output tokens
            at max_num_seqs --batch-size (256); per-call times of InputBuffers.prepare,
            SamplingMetadata.build, Sampler.__call__ and ModelRunner._sample (rows,
            metadata, sampler, outputs) over the steps that run a full decode batch, and
            ms per step over all steps
    micro   the same calls on fabricated batches (256 decode rows; a mix of prefill
            chunks and decode rows; several sampling mixes), median of --repeats calls

Usage: python benchmarks/host_profile.py [loop|micro|all] [--cprofile] [--no-gc] [--no-freeze]
           [--batch-size 1024 --max-num-batched-tokens 16384 --output-kind final_only]
To time another checkout's kiln against this one's, put it first on the path:
PYTHONPATH=/path/to/other/checkout python benchmarks/host_profile.py.

Run it on an otherwise idle machine: other processes on the cores move these numbers.
Torch runs on one thread, so the sampler's CPU compute does not compete with the host work.
Python's cyclic garbage collector runs in the loop as in production (start-up objects
frozen and its thresholds raised, as from_engine_dir does on CUDA; KILN_GC_THRESHOLD=python
for Python's own); its pauses land in whichever call happens to allocate, so --no-gc shows
the calls' own cost.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import pstats
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests.helpers builds the model

from kiln.runtime import collector
from kiln.runtime.input_batch import BatchRow, InputBuffers
from kiln.runtime.sampler import Sampler, SamplingMetadata, SamplingRow
from kiln.runtime.sampling_params import SamplingParams

BATCH_SIZE = 256
BLOCK_SIZE = 16
PROMPT_LEN = 128
OUTPUT_LEN = 128
VOCAB_SIZE = 128
MAX_MODEL_LEN = 512


def format_times(name: str, seconds: list[float]) -> str:
    microseconds = sorted(s * 1e6 for s in seconds)
    return (
        f"  {name:<26} median {statistics.median(microseconds):8.1f} us   "
        f"p10 {microseconds[len(microseconds) // 10]:8.1f}   "
        f"p90 {microseconds[9 * len(microseconds) // 10]:8.1f}   ({len(microseconds)} calls)"
    )


# ---- loop: the real engine with a stub model ------------------------------------------


def tiny_engine(directory: Path) -> Path:
    import transformers

    from kiln.compiler.builder import build_engine
    from kiln.config import BuildConfig
    from tests.helpers import save_tiny_hf_model

    if not (directory / "engine" / "engine.json").exists():
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=1024,
        )
        save_tiny_hf_model(config, directory / "hf")
        build_config = BuildConfig(dtype="float32")
        build_engine(directory / "hf", directory / "engine", build_config, progress=False)
    return directory / "engine"


def timed(calls: list[tuple[int, float]], size_of, function):
    """Wrap function to record (batch size, seconds) per call."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        calls.append((size_of(*args, **kwargs), time.perf_counter() - started))
        return result

    return wrapper


def run_loop(num_requests: int, work_dir: Path, profile: bool, collect_garbage: bool,
             output_kind: str = "cumulative", max_num_batched_tokens: int = 8192,
             freeze: bool = True) -> None:
    from kiln.compiler.manifest import open_engine
    from kiln.config import EngineConfig
    from kiln.runtime.engine import LLMEngine

    # Enough blocks that a full batch never waits for KV: the loop measures host work.
    num_kv_blocks = max(4096, BATCH_SIZE * (PROMPT_LEN + OUTPUT_LEN) // BLOCK_SIZE + 64)
    engine = LLMEngine(
        open_engine(tiny_engine(work_dir)),
        EngineConfig(
            device="cpu", block_size=BLOCK_SIZE, max_num_seqs=BATCH_SIZE,
            max_model_len=MAX_MODEL_LEN, num_kv_blocks=num_kv_blocks,
            max_num_batched_tokens=max_num_batched_tokens,
        ),
    )
    # As LLMEngine.from_engine_dir does on CUDA: start-up objects out of the collector's
    # sight and its thresholds raised (KILN_GC_THRESHOLD=python keeps Python's), so its
    # passes cost what they cost in production.
    collector.tune_for_engine()
    model = engine.runner.model
    model.forward = lambda input_ids, positions, kv_caches, metadata: torch.zeros(
        input_ids.shape[0], 64
    )
    model.compute_logits = lambda hidden: torch.randn(hidden.shape[0], VOCAB_SIZE)

    calls: dict[str, list[tuple[int, float]]] = defaultdict(list)
    buffers = engine.runner.buffers
    buffers.prepare = timed(
        calls["InputBuffers.prepare"], lambda scheduled, *a, **k: len(scheduled), buffers.prepare
    )
    original_build = SamplingMetadata.build
    SamplingMetadata.build = timed(
        calls["SamplingMetadata.build"], lambda rows, *a, **k: len(rows), original_build
    )
    runner = engine.runner
    runner.sampler = timed(
        calls["Sampler.__call__"], lambda logits, *a, **k: logits.shape[0], runner.sampler
    )
    # Rows, metadata, sampler and output handling together.
    runner._sample = timed(
        calls["ModelRunner._sample"], lambda logits, *a, **k: logits.shape[0], runner._sample
    )

    generator = torch.Generator().manual_seed(0)
    for _ in range(num_requests):
        prompt = torch.randint(0, VOCAB_SIZE, (PROMPT_LEN,), generator=generator).tolist()
        engine.add_request(
            None,
            {"prompt_token_ids": prompt},
            SamplingParams(temperature=0.8, max_tokens=OUTPUT_LEN, ignore_eos=True,
                           output_kind=output_kind),
        )
    profiler = cProfile.Profile() if profile else None
    steps = 0
    if not collect_garbage:
        gc.disable()
    # The collector's passes during the loop: count, seconds and objects freed per generation.
    passes = {generation: [0, 0.0, 0] for generation in range(3)}
    pass_started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            pass_started[0] = time.perf_counter()
            return
        record = passes[info["generation"]]
        record[0] += 1
        record[1] += time.perf_counter() - pass_started[0]
        record[2] += info["collected"]

    gc.callbacks.append(on_gc)
    started = time.perf_counter()
    try:
        if profiler:
            profiler.enable()
        # As LLM.generate and `kiln bench throughput` (a large batch frozen for the run).
        with engine.offline_batch(num_requests if freeze else 0):
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
    finally:
        if profiler:
            profiler.disable()
        SamplingMetadata.build = original_build
        gc.enable()
        gc.callbacks.remove(on_gc)
    elapsed = time.perf_counter() - started
    notes = (" (profiled)" if profile else "") + ("" if collect_garbage else " (gc off)")
    print(
        f"loop: {num_requests} requests, {steps} steps, {elapsed:.2f} s, "
        f"{1000 * elapsed / steps:.2f} ms/step{notes}"
    )
    print("gc passes: " + "; ".join(
        f"gen{generation} {count} ({1000 * seconds:.0f} ms, {collected} freed)"
        for generation, (count, seconds, collected) in passes.items()))
    print(f"per call at batch {BATCH_SIZE}:")
    for name, records in calls.items():
        print(format_times(name, [seconds for size, seconds in records if size == BATCH_SIZE]))
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


# ---- micro: the same calls on fabricated batches --------------------------------------


def decode_request(index: int, rng: random.Random) -> BatchRow:
    """A request part-way through its 128 output tokens: one token, ~9-16 blocks."""
    num_computed = PROMPT_LEN + rng.randrange(OUTPUT_LEN)
    num_blocks = -(-(num_computed + 1) // BLOCK_SIZE)
    block_ids = rng.sample(range(1, 4096), num_blocks)
    return BatchRow(f"r{index}", [rng.randrange(VOCAB_SIZE)], num_computed, block_ids, (0,))


def prefill_request(index: int, rng: random.Random, length: int) -> BatchRow:
    block_ids = rng.sample(range(1, 4096), -(-length // BLOCK_SIZE))
    token_ids = [rng.randrange(VOCAB_SIZE) for _ in range(length)]
    return BatchRow(f"p{index}", token_ids, 0, block_ids, (length - 1,))


def sampling_rows(params_of, rng: random.Random) -> list[SamplingRow]:
    rows = []
    for index in range(BATCH_SIZE):
        prompt = [rng.randrange(VOCAB_SIZE) for _ in range(PROMPT_LEN)]
        output = [rng.randrange(VOCAB_SIZE) for _ in range(rng.randrange(OUTPUT_LEN))]
        rows.append(SamplingRow(params_of(index), prompt, output, eos_token_id=2))
    return rows


SAMPLING_MIXES = {
    "random T=0.8": lambda i: SamplingParams(temperature=0.8, ignore_eos=True),
    "greedy": lambda i: SamplingParams(temperature=0.0, ignore_eos=True),
    "mixed features": lambda i: [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=0.7, repetition_penalty=1.1, presence_penalty=0.5),
        SamplingParams(
            temperature=0.9, max_tokens=OUTPUT_LEN, min_tokens=100, stop_token_ids=[5, 7],
            logprobs=2,
        ),
    ][i % 5],
}


def call_times(function, repeats: int) -> list[float]:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def run_micro(repeats: int) -> None:
    rng = random.Random(0)
    max_blocks = -(-MAX_MODEL_LEN // BLOCK_SIZE)
    buffers = InputBuffers(8192, BATCH_SIZE, max_blocks, "cpu")
    decode_batch = [decode_request(i, rng) for i in range(BATCH_SIZE)]
    # A step that admits two new prompts (one chunked) beside running decodes.
    mixed_batch = decode_batch[:200] + [prefill_request(0, rng, 128), prefill_request(1, rng, 500)]
    print(f"micro: median of {repeats} calls")
    print(format_times(
        f"prepare decode x{BATCH_SIZE}",
        call_times(lambda: buffers.prepare(decode_batch, BLOCK_SIZE), repeats),
    ))
    print(format_times(
        "prepare 200 decode+2 prefill",
        call_times(lambda: buffers.prepare(mixed_batch, BLOCK_SIZE), repeats),
    ))
    sampler = Sampler()
    logits = torch.randn(BATCH_SIZE, VOCAB_SIZE)
    for name, params_of in SAMPLING_MIXES.items():
        rows = sampling_rows(params_of, rng)
        print(format_times(
            f"build {name}",
            call_times(lambda: SamplingMetadata.build(rows, VOCAB_SIZE, "cpu"), repeats),
        ))
        metadata = SamplingMetadata.build(rows, VOCAB_SIZE, "cpu")
        print(format_times(
            f"sampler {name}", call_times(lambda: sampler(logits, metadata), repeats)
        ))


def main() -> None:
    global BATCH_SIZE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=["loop", "micro", "all"], default="all")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--cprofile", action="store_true", help="profile the loop with cProfile")
    parser.add_argument("--no-gc", action="store_true", help="no cyclic GC during the loop")
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave the queued requests in the collector's sight (LLM.generate "
                             "freezes a batch of OFFLINE_FREEZE_AT or more)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kiln-host-profile"))
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help="max_num_seqs of the loop, and the batch the per-call times are of")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--output-kind", choices=["cumulative", "final_only"], default="cumulative",
                        help="final_only: as LLM.generate and the throughput bench")
    args = parser.parse_args()
    BATCH_SIZE = args.batch_size
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.mode in ("micro", "all"):
        run_micro(args.repeats)
    if args.mode in ("loop", "all"):
        run_loop(args.num_requests, args.work_dir, args.cprofile, collect_garbage=not args.no_gc,
                 output_kind=args.output_kind, max_num_batched_tokens=args.max_num_batched_tokens,
                 freeze=not args.no_freeze)


if __name__ == "__main__":
    main()
