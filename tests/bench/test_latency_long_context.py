"""`kiln bench latency`'s long-context parts on a tiny CPU engine: TTFT lengths are capped at
the context's end, and long-context decode runs every batch over one shared, prefix-cached
prompt."""

from __future__ import annotations

from kiln.bench import latency
from tests.helpers import build_tiny_engine, make_cpu_engine


def test_ttft_length_and_shared_prompt_decode(tmp_path):
    engine = make_cpu_engine(build_tiny_engine(tmp_path), max_model_len=96)
    assert latency.ttft_prompt_len(engine, 64) == 64
    assert latency.ttft_prompt_len(engine, 131072) == 95  # the context less the first token
    points = latency.long_context_decode(engine, 200, [1, 3], new_tokens=4)
    assert [p["batch_size"] for p in points] == [1, 3]
    assert all(p["context_len"] == 92 and p["decode_tok_s"] > 0 for p in points)
    assert not engine.has_unfinished_requests()
    engine.close()


def test_batched_decode_counts_only_the_tokens_of_its_window(tmp_path):
    # Four 40-token prompts through 32-token steps (decode rows take one token of a step's
    # budget each): request 0 gets its first token in step 2 and its third in step 4,
    # request 1 in steps 3 and 5, request 2 in 4 and 6, request 3 its first in step 6, which
    # opens the timed window. Inside it only request 3's last 2 tokens remain; the old count,
    # batch x (new_tokens - 1) = 8, credited the window with tokens generated before it.
    engine = make_cpu_engine(build_tiny_engine(tmp_path), max_model_len=96,
                             max_num_batched_tokens=32, max_num_seqs=4)
    point = latency.decode_speed(engine, 4, 40, 3, vocab_low=1)
    assert point["finished_before_window"] == 3
    assert point["window_tokens"] == 2
    assert point["decode_tok_s"] > 0
    assert not engine.has_unfinished_requests()
    engine.close()
