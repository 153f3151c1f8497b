"""The official openai client (sync and async, streaming and not) against the server, on the
real SmolLM2 engine: completions, chat, usage, finish reasons, n, stop, seed, logprobs."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY, MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


def test_models(client):
    [model] = client.models.list().data
    assert model.id == MODEL and model.owned_by == "kiln"


def test_chat_non_streaming_answers_paris(client):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_streamed_equals_non_streamed(client):
    kwargs = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    pieces, finish_reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish_reasons == [whole.choices[0].finish_reason]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_streamed_equals_non_streamed(client):
    kwargs = dict(model=MODEL, prompt="The three primary colours are", temperature=0, max_tokens=10)
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_async_client_streaming_and_not(server):
    async def main(url):
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as aclient:
            kwargs = dict(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=8)
            whole, stream = await asyncio.gather(
                aclient.completions.create(**kwargs), aclient.completions.create(**kwargs, stream=True))
            streamed = "".join([c.choices[0].text async for c in stream if c.choices])
            chat = await aclient.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                         max_tokens=16)
            return whole.choices[0].text, streamed, chat.choices[0].message.content

    whole, streamed, chat = asyncio.run(main(server.url))
    assert streamed == whole and whole
    assert "Paris" in chat


def test_n_seed_and_stop(client):
    kwargs = dict(model=MODEL, prompt="My favourite food is", temperature=1.0, max_tokens=8, n=3, seed=1234)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == sum(
        len(c.model_extra["token_ids"]) for c in client.completions.create(
            **kwargs, extra_body={"return_token_ids": True}).choices)
    greedy = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12)
    text = greedy.choices[0].text
    stop = text.strip().split(" ")[1]  # a word the model does produce
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)


def test_logprobs(client):
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=5,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # Greedy: the sampled token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
        assert entry.logprob <= 0
    completion = client.completions.create(model=MODEL, prompt="Hello", temperature=0, max_tokens=4, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=5000)
    assert "maximum context length is 1024" in error.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_tokenize_round_trip(server):
    with server.client() as http:
        tokens = http.post("/tokenize", json={"prompt": "Hello, kiln!"}).json()
        assert tokens["count"] == len(tokens["tokens"]) > 0
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
        assert text == "Hello, kiln!"
        chat = http.post("/tokenize", json={"messages": QUESTION}).json()
        assert chat["count"] > tokens["count"]


def test_health_ready_metrics(server):
    with server.client() as http:
        assert http.get("/ready").json() == {"status": "ready"}
        metrics = http.get("/metrics").text
    for name in ("kiln_num_requests_running", "kiln_num_requests_waiting", "kiln_kv_cache_usage_perc",
                 "kiln_prefix_cache_hit_rate", "kiln_num_preemptions_total", "kiln_prompt_tokens_total",
                 "kiln_generation_tokens_total", "kiln_time_to_first_token_seconds_bucket",
                 "kiln_inter_token_latency_seconds_bucket", "kiln_e2e_request_latency_seconds_bucket"):
        assert name in metrics, name
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed
