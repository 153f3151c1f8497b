"""StructuredOutputsParams validation, the bitmask against xgrammar's own kernel, the compiler's
error text, and kiln without xgrammar."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kiln.runtime.sampling_params import SamplingParams
from kiln.structured.bitmask import (
    allocate_token_bitmask, apply_token_bitmask, widen_token_bitmask,
)
from kiln.structured.compiler import choice_grammar, unenforced_keywords
from kiln.structured.params import (
    MAX_CHOICES, MAX_CONSTRAINT_CHARS, MAX_SCHEMA_DEPTH, StructuredOutputsParams,
)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of json, json_object, regex, choice, grammar; got none"),
    ({"regex": "a", "grammar": "root ::= \"a\""}, "got regex, grammar"),
    ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
    ({"json": [1, 2]}, "must be a JSON schema object, got list"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"regex": "a" * (MAX_CONSTRAINT_CHARS + 1)}, f"the cap is {MAX_CONSTRAINT_CHARS}"),
    ({"choice": []}, "non-empty list of strings"),
    ({"choice": ["a", 3]}, "must hold non-empty strings, got 3"),
    ({"choice": ["c"] * (MAX_CHOICES + 1)}, f"the cap is {MAX_CHOICES}"),
    ({"json_object": 1}, "json_object must be a bool"),
])
def test_params_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        StructuredOutputsParams(**kwargs)


def test_schema_depth_cap_and_deep_documents_do_not_overflow():
    schema: dict = {"type": "integer"}
    for _ in range(MAX_SCHEMA_DEPTH - 1):
        schema = {"items": schema}
    StructuredOutputsParams(json=schema)  # at the cap: fine
    hostile: dict = {}
    for _ in range(50_000):  # far past Python's recursion limit: checked iteratively
        hostile = {"a": hostile}
    with pytest.raises(ValueError, match=f"nests 50001 levels deep; the cap is {MAX_SCHEMA_DEPTH}"):
        StructuredOutputsParams(json=hostile)


def test_cache_key_is_canonical():
    a = StructuredOutputsParams(json={"type": "object", "required": ["x"]})
    b = StructuredOutputsParams(json=json.dumps({"required": ["x"], "type": "object"}))
    assert a.cache_key() == b.cache_key()
    assert a.cache_key() != StructuredOutputsParams(json={"type": "object"}).cache_key()
    assert StructuredOutputsParams(regex="a").cache_key() != \
        StructuredOutputsParams(grammar="a").cache_key()


def test_sampling_params_field():
    with pytest.raises(ValueError, match="must be a kiln.structured.StructuredOutputsParams"):
        SamplingParams(structured_outputs={"regex": "a"})
    with pytest.raises(ValueError, match="min_tokens cannot be combined"):
        SamplingParams(min_tokens=1, structured_outputs=StructuredOutputsParams(regex="a"))


@pytest.mark.parametrize("vocab_size", [1, 31, 32, 33, 1000])
def test_bitmask_matches_xgrammar_kernel(vocab_size):
    xgrammar = pytest.importorskip("xgrammar")  # CI installs it: requirements-ci.txt
    generator = torch.Generator().manual_seed(vocab_size)
    bitmask = allocate_token_bitmask(3, vocab_size)
    bitmask.copy_(torch.randint(-2**31, 2**31 - 1, bitmask.shape, generator=generator,
                                dtype=torch.int64).to(torch.int32))
    bitmask[0] = -1  # a row allowing everything
    logits = torch.randn(3, vocab_size, generator=generator)
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bitmask, backend="cpu")
    apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)
    assert torch.isfinite(logits[0]).all()


def _allowed_ids(bitmask: torch.Tensor, vocab_size: int) -> list[set[int]]:
    logits = torch.zeros(bitmask.shape[0], vocab_size)
    apply_token_bitmask(logits, bitmask)
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


@pytest.mark.parametrize("grammar_vocab, vocab_size", [(64, 64), (45, 100), (64, 130), (33, 33)])
@pytest.mark.parametrize("rows, json_rows", [([0, 1, 2, 3], [0, 1, 2, 3]), ([1, 3], [3]),
                                             ([0, 1, 2, 3], [1]), ([2], [])])
def test_widened_bitmask_is_the_per_row_rule(grammar_vocab, vocab_size, rows, json_rows):
    """The slice-built mask against the rule written row by row: a constrained row allows
    what its matcher allowed (ids < grammar_vocab), less the control-token ban for JSON
    rows, and no padding id; a free row allows everything."""
    generator = torch.Generator().manual_seed(grammar_vocab * vocab_size + len(rows))
    filled = torch.randint(-2**31, 2**31 - 1, (4, -(-grammar_vocab // 32)), generator=generator,
                           dtype=torch.int64).to(torch.int32)
    grammar_words = allocate_token_bitmask(4, grammar_vocab)
    grammar_words[rows] = filled[rows]  # as xgrammar leaves it: only `rows` written
    ban_ids = set(range(0, vocab_size, 7))
    ban = allocate_token_bitmask(1, vocab_size)[0]
    for token_id in ban_ids:
        ban[token_id // 32] &= ~(1 << (token_id % 32))
    matcher_allowed = _allowed_ids(filled, -(-grammar_vocab // 32) * 32)
    expected = []
    for row in range(4):
        if row not in rows:
            expected.append(set(range(vocab_size)))
            continue
        allowed = {t for t in matcher_allowed[row] if t < grammar_vocab}
        expected.append(allowed - ban_ids if row in json_rows else allowed)
    bitmask = widen_token_bitmask(grammar_words, grammar_vocab, vocab_size, rows, json_rows,
                                  ban, pin_memory=False)
    assert bitmask.shape == (4, -(-vocab_size // 32))
    assert _allowed_ids(bitmask, vocab_size) == expected


def test_bitmask_shape_is_checked():
    with pytest.raises(ValueError, match="does not fit logits"):
        apply_token_bitmask(torch.zeros(2, 64), allocate_token_bitmask(2, 32))


def test_choice_grammar_escapes():
    assert choice_grammar(['a"b', "c\\d"]) == 'root ::= "a\\"b" | "c\\\\d"'


def test_unenforced_keywords_are_found_anywhere():
    schema = {"type": "object", "properties": {"a": {"type": "array", "contains": {"not": {}}}}}
    assert unenforced_keywords(schema) == ["contains", "not"]
    # A property called "not" and an enum value "contains" are not keywords.
    assert unenforced_keywords({"type": "object", "properties": {"not": {"enum": ["contains"]}},
                                "$defs": {"contains": {"type": "integer"}}}) == []


def test_kiln_imports_and_refuses_clearly_without_xgrammar(tmp_path):
    # A fresh interpreter where `import xgrammar` fails: kiln, its sampler and server still
    # import, and asking for a grammar names the install command.
    script = """
import sys
sys.modules["xgrammar"] = None  # import xgrammar -> ImportError
import kiln.runtime.engine, kiln.runtime.sampler, kiln.serve.openai_api
from kiln.structured import StructuredOutputsParams
from kiln.structured.backend import StructuredOutputManager
try:
    StructuredOutputManager(None, 64, [0])
except ValueError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("structured outputs need xgrammar: "
                                     "pip install 'kiln[structured]'")
