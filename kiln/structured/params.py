"""What a request asks its output to match: one `StructuredOutputsParams`.

The shape follows vLLM's `StructuredOutputsParams`, so a client written for vLLM's
`structured_outputs` works unchanged. Exactly one constraint field is set; that is checked
here, at construction, with a `ValueError` naming the problem, so the engine never sees an
ambiguous request. Size caps (RELIABILITY.md, "parameter amplification") are checked here too:
compiling a grammar costs host time, and one request must not be able to buy minutes of it.

Whether the constraint compiles (a bad regex, a schema xgrammar rejects) is found later, by
`kiln.structured.compiler`, before the request is admitted.
"""

from __future__ import annotations

import json as json_module
from dataclasses import dataclass

# Caps on one constraint's text. A schema past them is rejected, not truncated.
MAX_CONSTRAINT_CHARS = 64 * 1024  # schema JSON text, regex, or EBNF grammar
MAX_SCHEMA_DEPTH = 32  # nesting of JSON objects/arrays in the schema document itself
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 1024

CONSTRAINT_FIELDS = ("json", "json_object", "regex", "choice", "grammar")


def _nesting_depth(value: object) -> int:
    """Depth of nested dicts/lists in a JSON document (iterative: a hostile schema nested
    100,000 deep must not overflow Python's stack here)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in node)
    return deepest


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One output constraint; exactly one field is set.

    json: a JSON schema, as a dict or as its JSON text (normalised to the dict).
    json_object: any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    regex: the output matches this regular expression in full.
    choice: the output is exactly one of these strings.
    grammar: an EBNF grammar in xgrammar's (GBNF-style) syntax, start rule `root`.
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        set_fields = [name for name in CONSTRAINT_FIELDS if self._is_set(name)]
        if len(set_fields) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of "
                f"{', '.join(CONSTRAINT_FIELDS)}; got "
                f"{', '.join(set_fields) if set_fields else 'none'}"
            )
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, "
                             f"got {self.json_object!r}")
        if self.json is not None:
            object.__setattr__(self, "json", self._checked_schema(self.json))
        for name in ("regex", "grammar"):
            text = getattr(self, name)
            if text is None:
                continue
            if not isinstance(text, str) or not text:
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
            if len(text) > MAX_CONSTRAINT_CHARS:
                raise ValueError(
                    f"structured_outputs.{name} is {len(text)} characters; the cap is "
                    f"{MAX_CONSTRAINT_CHARS}"
                )
        if self.choice is not None:
            object.__setattr__(self, "choice", self._checked_choice(self.choice))

    def _is_set(self, name: str) -> bool:
        value = getattr(self, name)
        return value is not False if name == "json_object" else value is not None

    @staticmethod
    def _checked_schema(schema: object) -> dict:
        if isinstance(schema, str):
            if len(schema) > MAX_CONSTRAINT_CHARS:
                raise ValueError(f"structured_outputs.json schema is {len(schema)} "
                                 f"characters; the cap is {MAX_CONSTRAINT_CHARS}")
            try:
                schema = json_module.loads(schema)
            except ValueError as error:
                raise ValueError(f"structured_outputs.json is not valid JSON: {error}") from None
        if isinstance(schema, bool):
            # JSON Schema allows `true`/`false` as whole schemas; keep the dict type simple.
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, "
                             f"got {type(schema).__name__}")
        depth = _nesting_depth(schema)
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"structured_outputs.json schema nests {depth} levels deep; "
                             f"the cap is {MAX_SCHEMA_DEPTH}")
        try:
            text = json_module.dumps(schema, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"structured_outputs.json is not JSON-serialisable: {error}") from None
        if len(text) > MAX_CONSTRAINT_CHARS:
            raise ValueError(f"structured_outputs.json schema is {len(text)} characters "
                             f"as JSON; the cap is {MAX_CONSTRAINT_CHARS}")
        return schema

    @staticmethod
    def _checked_choice(choice: object) -> list[str]:
        if not isinstance(choice, (list, tuple)) or not choice:
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        if len(choice) > MAX_CHOICES:
            raise ValueError(f"structured_outputs.choice holds {len(choice)} strings; "
                             f"the cap is {MAX_CHOICES}")
        for item in choice:
            if not isinstance(item, str) or not item:
                raise ValueError(f"structured_outputs.choice must hold non-empty strings, "
                                 f"got {item!r}")
            if len(item) > MAX_CHOICE_CHARS:
                raise ValueError(f"structured_outputs.choice strings must be at most "
                                 f"{MAX_CHOICE_CHARS} characters, got one of {len(item)}")
        return list(choice)

    @property
    def kind(self) -> str:
        """Which field is set: one of CONSTRAINT_FIELDS."""
        return next(name for name in CONSTRAINT_FIELDS if self._is_set(name))

    def cache_key(self) -> tuple[str, str]:
        """A canonical, hashable key: equal constraints (a schema dict with keys in another
        order, or given as text) share one compiled grammar."""
        kind = self.kind
        if kind == "json":
            return kind, json_module.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if kind == "json_object":
            return kind, ""
        if kind == "choice":
            return kind, json_module.dumps(self.choice)
        return kind, getattr(self, kind)
