"""Step messages as msgpack bytes (wire.py): an exact round trip, and nothing but the message
classes ever comes out of decoding."""

from __future__ import annotations

import msgpack
import pytest

from kiln.runtime import wire
from kiln.runtime.messages import (
    ModelRunnerOutput,
    NewRequest,
    ScheduledRequest,
    SchedulerOutput,
    TokenLogprobs,
)
from kiln.runtime.request import Request
from kiln.runtime.sampling_params import SamplingParams


def rich_scheduler_output() -> SchedulerOutput:
    params = SamplingParams(
        n=1, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
        seed=2**64 - 1, max_tokens=64, min_tokens=2, stop=["\n\n", "END"],
        stop_token_ids=[7, 9], logprobs=3, output_kind="final_only",
    )
    return SchedulerOutput(
        scheduled=[
            ScheduledRequest("a", 0, 5, logits_offsets=(4,), new_block_ids=[3, 1]),
            ScheduledRequest("b", 12, 1, new_token_ids=[42], new_block_ids_start=3,
                             new_block_ids=[8], logits_offsets=(0,)),
            ScheduledRequest("c", 30, 4, spec_token_ids=[5, 6, 7], logits_offsets=(0, 1, 2, 3)),
            ScheduledRequest("d", 0, 16),  # a non-final prefill chunk: no logits
        ],
        new_requests=[NewRequest("a", [1, 2, 3, 4, 5], params, eos_token_id=2),
                      NewRequest("d", list(range(40)), SamplingParams(), eos_token_id=None)],
        preempted_request_ids=["e"],
        finished_request_ids=["f", "g"],
    )


def test_scheduler_output_round_trips_exactly():
    message = rich_scheduler_output()
    decoded = wire.decode(wire.encode(message))
    assert decoded == message
    assert decoded is not message
    # Field types survive too: tuples stay tuples, lists stay lists.
    assert isinstance(decoded.scheduled[2].logits_offsets, tuple)
    assert isinstance(decoded.scheduled[2].spec_token_ids, list)
    assert isinstance(decoded.new_requests[0].sampling_params, SamplingParams)
    assert decoded.new_requests[0].sampling_params.stop == ["\n\n", "END"]


def test_runner_output_round_trips_exactly():
    message = ModelRunnerOutput(
        sampled_token_ids={"a": [5], "c": [5, 6, 11]},
        logprobs={"a": [TokenLogprobs(5, -0.25, [(5, -0.25), (9, -1.5)])],
                  "c": [TokenLogprobs(t, float("-inf"), []) for t in (5, 6, 11)]},
    )
    decoded = wire.decode(wire.encode(message))
    assert decoded == message
    assert decoded.logprobs["a"][0].top == [(5, -0.25), (9, -1.5)]
    assert isinstance(decoded.logprobs["a"][0].top[0], tuple)


def test_only_message_classes_travel():
    request = Request("r", [1, 2], SamplingParams())
    with pytest.raises(TypeError, match="Request cannot travel in a step message"):
        wire.encode(SchedulerOutput(scheduled=[request]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xc1", "not a kiln step message"),  # a byte msgpack never uses
        (msgpack.packb(msgpack.ExtType(1, msgpack.packb(["Request", {}]))),
         "'Request' is not a step message class"),
        (msgpack.packb(msgpack.ExtType(1, msgpack.packb(["os.system", {"cmd": "x"}]))),
         "is not a step message class"),
        (msgpack.packb(msgpack.ExtType(1, msgpack.packb(["NewRequest", {"bogus": 1}]))),
         "bad fields for NewRequest"),
        (msgpack.packb(msgpack.ExtType(9, b"")), "unknown msgpack extension type 9"),
        (msgpack.packb(msgpack.ExtType(1, msgpack.packb(
            ["SamplingParams", {"temperature": -1.0}]))), "temperature"),
    ],
)
def test_bad_bytes_are_refused_with_the_reason(data, message):
    with pytest.raises(ValueError, match=message):
        wire.decode(data)
