"""200 generated JSON schemas through a tiny random-weight engine with SmolLM2's tokenizer:
every output parses and validates (jsonschema_rs), at temperature 0 and 1, in batches of 64
and one at a time. The model's text is noise; only the grammar makes it JSON.

The max_tokens rule (schema_generator.py): an output cut by max_tokens fails the test
unless its schema admits unboundedly long outputs; then it is only counted, and most must
still complete."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest

from kiln.runtime.sampling_params import SamplingParams
from kiln.structured import StructuredOutputsParams
from tests.helpers import run_to_completion
from tests.structured.schema_generator import admits_long_outputs, generated_schemas

SCHEMAS = generated_schemas(200)
MAX_TOKENS = 160
PROMPT = [1, 504, 3458, 28, 30]


def _params(schema: dict, temperature: float, seed: int) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=MAX_TOKENS,
                          structured_outputs=StructuredOutputsParams(json=schema))


def _check(outputs, schemas) -> tuple[int, list[str]]:
    """(outputs cut by max_tokens under the rule, failures)."""
    cut, failures = 0, []
    for index, (output, schema) in enumerate(zip(outputs, schemas)):
        completion = output.outputs[0]
        if completion.finish_reason == "length":
            if admits_long_outputs(schema):
                cut += 1
            else:
                failures.append(f"schema {index} hit max_tokens: {completion.text[:80]!r}")
            continue
        assert completion.finish_reason == "stop", completion
        try:
            value = json.loads(completion.text)
        except ValueError as error:
            failures.append(f"schema {index}: not JSON ({error}): {completion.text!r}")
            continue
        if not jsonschema_rs.validator_for(schema).is_valid(value):
            failures.append(f"schema {index}: {completion.text!r} breaks {json.dumps(schema)}")
    return cut, failures


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_of_64_validates(structured_engine, temperature):
    cut, failures = 0, []
    for start in range(0, len(SCHEMAS), 64):
        schemas = SCHEMAS[start:start + 64]
        params = [_params(schema, temperature, seed=start + i) for i, schema in enumerate(schemas)]
        outputs = run_to_completion(structured_engine, [PROMPT] * len(schemas), params)
        batch_cut, batch_failures = _check(outputs, schemas)
        cut += batch_cut
        failures += batch_failures
    assert not failures, "\n".join(failures[:10])
    print(f"temperature {temperature}: {cut} of {len(SCHEMAS)} outputs hit max_tokens")
    assert cut <= len(SCHEMAS) // 10, f"{cut} of {len(SCHEMAS)} outputs hit max_tokens"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_one_at_a_time_validates(structured_engine, temperature):
    schemas = SCHEMAS[::12]  # 17 of them: batch 1 costs a step per token each
    outputs = [run_to_completion(structured_engine, [PROMPT], [_params(schema, temperature, i)])[0]
               for i, schema in enumerate(schemas)]
    cut, failures = _check(outputs, schemas)
    assert not failures, "\n".join(failures[:10])
    assert cut <= 2


def test_generator_covers_the_keywords():
    text = json.dumps(SCHEMAS)
    for keyword in ("required", "enum", "pattern", "minimum", "maxItems", "maxLength",
                    '"array"', '"object"', '"number"', '"boolean"', '"null"'):
        assert keyword in text, keyword
    assert len({json.dumps(schema, sort_keys=True) for schema in SCHEMAS}) > 190
