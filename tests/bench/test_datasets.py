"""Saved benchmark request files: round trip, and every malformed line named."""

from __future__ import annotations

import pytest

from kiln.bench.datasets import BenchRequest, load_requests, save_requests
from kiln.errors import KilnError


def test_round_trip(tmp_path):
    requests = [BenchRequest([1, 2, 3], 7), BenchRequest([40000], 1)]
    path = save_requests(requests, tmp_path / "sub" / "r.jsonl")
    assert load_requests(path, vocab_size=49152) == requests


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "r.jsonl:2: not valid JSON"),
        ("[1, 2]", "r.jsonl:2: expected an object"),
        ('{"prompt_token_ids": [], "output_len": 3}', "non-empty list"),
        ('{"prompt_token_ids": "abc", "output_len": 3}', "non-empty list"),
        ('{"prompt_token_ids": [1, -1], "output_len": 3}', "token id -1 is not an int in [0, 100)"),
        ('{"prompt_token_ids": [1, 100], "output_len": 3}', "token id 100"),
        ('{"prompt_token_ids": [1, true], "output_len": 3}', "token id True"),
        ('{"prompt_token_ids": [1, 2.5], "output_len": 3}', "token id 2.5"),
        ('{"prompt_token_ids": [1], "output_len": 0}', "output_len must be a positive int, got 0"),
        ('{"prompt_token_ids": [1], "output_len": 1e9}', "output_len must be a positive int"),
        ('{"prompt_token_ids": [1]}', "output_len must be a positive int, got None"),
    ],
)
def test_bad_lines_are_named(tmp_path, line, message):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt_token_ids": [5], "output_len": 2}\n' + line + "\n")
    with pytest.raises(KilnError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_requests(path, vocab_size=100)


def test_missing_empty_and_unset_files(tmp_path):
    with pytest.raises(KilnError, match="needs --dataset-path"):
        load_requests(None)
    with pytest.raises(KilnError, match="does not exist"):
        load_requests(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(KilnError, match="holds no requests"):
        load_requests(tmp_path / "empty.jsonl")
