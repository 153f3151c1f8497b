"""Seeded random JSON schemas for the structured-output tests: objects (required and optional
properties, no extras), arrays, enums, nesting, integers and numbers with bounds, strings with
lengths and patterns, booleans, nulls.

Every size is bounded (maxLength, maxItems, integer ranges) so a complete output fits in the
tests' max_tokens. Two things stay unbounded: a "number"'s fraction digits (JSON has no
bound on them and xgrammar enforces none) and a string's characters when they are
multi-token. So the rule the tests use: an output that hit max_tokens before its grammar
completed is a failure unless its schema `admits_long_outputs` (has a "number").
"""

from __future__ import annotations

import random

PATTERNS = ("^[a-z]{1,6}$", "^[A-Z][a-z]{0,4}$", "^[0-9]{2,4}-[a-z]{1,3}$", "^(yes|no|maybe)$",
            "^[a-f0-9]{4}$")
WORDS = ("alpha", "beta", "gamma", "delta", "red", "green", "blue", "x", "y_z", "n1", "é", "a b")


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(("integer", "integer", "number", "string", "string", "boolean", "enum",
                       "null", "pattern"))
    if kind == "integer":
        low = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 5000)}
    if kind == "number":
        low = rng.uniform(-100, 100)
        return {"type": "number", "minimum": round(low, 2), "maximum": round(low + 50, 2)}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 10)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "enum":
        values = rng.sample(WORDS, rng.randint(1, 4))
        if rng.random() < 0.3:
            values.append(rng.randint(0, 9))
        return {"enum": values}
    return {"type": kind}


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    roll = rng.random()
    if depth >= 3 or (depth > 0 and roll < 0.45):
        return _leaf(rng)
    if depth > 0 and roll < 0.65:
        return {"type": "array", "items": random_schema(rng, depth + 1),
                "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
    names = rng.sample(["id", "name", "value", "tags", "kind", "count", "child", "flag", "score",
                        "note"], rng.randint(1, 4))
    properties = {name: random_schema(rng, depth + 1) for name in names}
    required = [name for name in names if rng.random() < 0.7]
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


def generated_schemas(count: int, seed: int = 14) -> list[dict]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(count)]


def admits_long_outputs(schema: object) -> bool:
    """Whether a valid output may be longer than any bound (see the module docstring)."""
    if isinstance(schema, dict):
        return schema.get("type") == "number" or any(
            admits_long_outputs(value) for value in schema.values())
    if isinstance(schema, list):
        return any(admits_long_outputs(item) for item in schema)
    return False
