"""Many streams at once: nothing lost, duplicated or reordered; and clients that vanish at
random points (queued, prefill, decode) leave no running request and no KV block behind."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import httpx

from tests.serve.conftest import MODEL


async def read_stream(client: httpx.AsyncClient, body: dict) -> dict:
    """Parse one SSE completion stream: token ids and text per choice, finish reasons, usage."""
    token_ids, text, finishes, usage, done, events_after_done = [], [], [], None, False, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            if done:
                events_after_done += 1
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                token_ids.extend(choice["token_ids"])
                text.append(choice["text"])
                if choice["finish_reason"] is not None:
                    finishes.append(choice["finish_reason"])
    return {"token_ids": token_ids, "text": "".join(text), "finishes": finishes, "usage": usage,
            "done": done, "events_after_done": events_after_done}


def test_64_concurrent_streams_lose_nothing(server):
    prompts = [f"Fact number {i} about the sea:" for i in range(64)]
    common = {"model": MODEL, "temperature": 0, "max_tokens": 8, "return_token_ids": True}
    # The reference: the same greedy requests, one at a time, not streamed.
    with server.client() as http:
        expected = {}
        for prompt in prompts[:8]:
            body = http.post("/v1/completions", json={**common, "prompt": prompt}).json()
            expected[prompt] = body["choices"][0]["token_ids"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(
                read_stream(client, {**common, "prompt": p, "stream": True,
                                     "stream_options": {"include_usage": True}})
                for p in prompts))

    results = asyncio.run(main())
    for prompt, result in zip(prompts, results):
        assert result["done"] and result["events_after_done"] == 0
        assert len(result["finishes"]) == 1, result["finishes"]
        assert result["usage"]["completion_tokens"] == len(result["token_ids"]) > 0
        if prompt in expected:  # batching with 63 others changes nothing
            assert result["token_ids"] == expected[prompt]
    server.wait_idle()


def test_100_random_disconnects_free_everything(server):
    scheduler = server.engine.scheduler
    server.wait_idle()
    idle_free_blocks = scheduler.kv_cache_manager.num_free_blocks
    rng = random.Random(0)
    # Three ways to leave, chosen per client so that each phase is hit however fast or loaded
    # the machine is (fixed delays made the outcome depend on the machine's speed): "early"
    # clients give up 0-0.3 s after sending, while the 100 requests that arrived together
    # are still queued or in prefill (their first tokens take seconds on 2 CPU cores);
    # "mid-stream" ones close a stream after reading k < max_tokens token events (decode);
    # the rest stay to the end, streamed or not.
    plans = []
    for _ in range(100):
        max_tokens, draw = rng.randint(2, 16), rng.random()
        if draw < 0.4:
            plans.append(("early", max_tokens, rng.random() < 0.5, rng.uniform(0.0, 0.3)))
        elif draw < 0.8:
            plans.append(("mid-stream", max_tokens, True, rng.randint(1, max_tokens - 1)))
        else:
            plans.append(("complete", max_tokens, rng.random() < 0.5, None))

    async def one(client: httpx.AsyncClient, index: int, way: str, max_tokens: int,
                  stream: bool, limit: float | int | None) -> str:
        """How far this client got before it went away: 'nothing' (queued or in prefill),
        'mid-stream' (some tokens read) or 'complete'."""
        body = {"model": MODEL, "prompt": f"Story {index}: once upon a time", "max_tokens": max_tokens,
                "ignore_eos": True, "stream": stream}
        events = 0

        async def request() -> bool:
            """Whether the client left before the end (a mid-stream client after `limit`
            token events; the stream may carry fewer events than tokens, then it ends)."""
            nonlocal events
            if not stream:
                await client.post("/v1/completions", json=body)
                return False
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events += 1
                        if way == "mid-stream" and events == limit:
                            return True  # closes the stream with tokens still to come
            return False

        if way == "early":
            try:
                await asyncio.wait_for(request(), timeout=limit)
            except asyncio.TimeoutError:  # the client goes away
                return "mid-stream" if events else "nothing"
            return "complete"
        return "mid-stream" if await request() else "complete"

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60,
                                     limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(one(client, i, *plan) for i, plan in enumerate(plans)))

    outcomes = Counter(asyncio.run(main()))
    # Every phase was hit: gone before a token, gone mid-stream, and stayed to the end.
    print(f"disconnect outcomes: {dict(outcomes)}")
    assert outcomes["nothing"] >= 10 and outcomes["mid-stream"] >= 10 and outcomes["complete"] >= 1, outcomes
    server.wait_idle()
    assert scheduler.num_running == 0 and scheduler.num_waiting == 0
    assert scheduler.kv_cache_manager.num_free_blocks == idle_free_blocks
    assert not server.state.active_request_ids
    scheduler.kv_cache_manager.check_invariants([])  # idle: no block may be owned
    # And the server still answers.
    with server.client() as http:
        body = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).json()
    assert body["usage"]["completion_tokens"] == 2
