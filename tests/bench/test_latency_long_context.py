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
