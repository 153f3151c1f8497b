"""AsyncLLMEngine: concurrent streams, deltas that add up, aborts that free blocks."""

from __future__ import annotations

import asyncio

import pytest

from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import build_tiny_engine, make_cpu_engine, run_to_completion


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("async"))


def new_engine(engine_dir) -> LLMEngine:
    return make_cpu_engine(engine_dir, num_kv_blocks=64)


def test_concurrent_streams_match_offline(engine_dir):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [[i + 1, i + 2, i + 3] for i in range(16)]

    outputs = run_to_completion(new_engine(engine_dir), prompts, [params] * len(prompts))
    expected = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, outputs)}

    async def main():
        engine = AsyncLLMEngine(new_engine(engine_dir))

        async def one(prompt):
            deltas, finishes = [], 0
            async for output in engine.generate(prompt, params):
                deltas.extend(output.outputs[0].delta_token_ids)
                finishes += output.finished
            return prompt, deltas, output.outputs[0].token_ids, finishes

        results = await asyncio.gather(*(one(p) for p in prompts))
        await engine.shutdown()
        return results

    for prompt, deltas, token_ids, finishes in asyncio.run(main()):
        assert deltas == token_ids == expected[tuple(prompt)]
        assert finishes == 1


def test_cancelled_streams_abort_and_free_blocks(engine_dir):
    async def main():
        engine = AsyncLLMEngine(new_engine(engine_dir))
        manager = engine.llm_engine.scheduler.kv_cache_manager
        idle = manager.num_free_blocks

        async def consume(prompt, stop_after):
            count = 0
            async for _ in engine.generate(prompt, SamplingParams(max_tokens=50, ignore_eos=True)):
                count += 1
                if count >= stop_after:
                    break  # the client goes away mid-stream

        await asyncio.gather(*(consume([1, 2, 3, i % 60 + 1], 1 + i % 5) for i in range(20)))
        # Aborts are applied by the loop before its next step; give it a moment.
        for _ in range(100):
            if not engine.llm_engine.has_unfinished_requests() and not engine._commands:
                break
            await asyncio.sleep(0.01)
        assert engine.llm_engine.scheduler.num_running == 0
        assert manager.num_free_blocks == idle
        await engine.shutdown()

    asyncio.run(main())


def test_bad_request_raises_and_engine_continues(engine_dir):
    async def main():
        engine = AsyncLLMEngine(new_engine(engine_dir))
        with pytest.raises(ValueError, match="prompt is empty"):
            [_ async for _ in engine.generate([], SamplingParams())]
        with pytest.raises(ValueError, match="max_model_len"):
            [_ async for _ in engine.generate(list(range(1, 60)) * 2, SamplingParams(max_tokens=50))]
        outputs = [o async for o in engine.generate([1, 2], SamplingParams(max_tokens=3, ignore_eos=True))]
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 3
        await engine.shutdown()

    asyncio.run(main())
