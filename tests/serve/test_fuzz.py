"""Schemathesis against /openapi.json: schema-valid and schema-breaking requests to every
operation, at least 1,000 in all, and not one 5xx; every error in OpenAI's shape.

Generated generation requests are kept cheap (a one token, n <= 2) so a thousand cases run
in well under a minute on the CPU; everything else about them is left to the fuzzer.
"""

from __future__ import annotations

import time
from collections import Counter

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.serve.conftest import MODEL

EXAMPLES_PER_OPERATION_AND_MODE = 126
MIN_CASES = 1000
MAX_SECONDS = 240  # the whole run is bounded even if the server gets slow


def _tame(case) -> None:
    """Keep the engine work per case small: one token, n <= 2, the served model."""
    body = case.body
    if not isinstance(body, dict):
        return

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for name in ("max_tokens", "max_completion_tokens"):
        if is_int(body.get(name)) and body[name] > 1:
            body[name] = 1
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 1  # else 16 (completions) or the whole context (chat)
    for name in ("n", "best_of"):
        if is_int(body.get(name)) and body[name] > 2:
            body[name] = 2
    if is_int(body.get("min_tokens")) and body["min_tokens"] > 1:
        body["min_tokens"] = 1
    if isinstance(body.get("model"), str):
        body["model"] = MODEL  # else nearly every case stops at 404


def test_schemathesis_no_server_errors(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=server.headers)
    session = requests.Session()
    session.headers.update(server.headers)
    cases: Counter = Counter()
    statuses: Counter = Counter()
    failures: list[str] = []
    seconds: Counter = Counter()
    started = time.monotonic()

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES_PER_OPERATION_AND_MODE, deadline=None, database=None,
                      derandomize=True, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                if time.monotonic() - started > MAX_SECONDS:
                    return
                _tame(case)
                case_started = time.monotonic()
                response = case.call(base_url=server.url, session=session, timeout=60)
                seconds[f"{operation.path} {response.status_code}"] += time.monotonic() - case_started
                cases[f"{operation.method.upper()} {operation.path} {mode.value}"] += 1
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(f"{response.status_code} {operation.path}: {case.body!r:.300}")
                elif response.status_code >= 400:
                    error = response.json().get("error", {})
                    assert isinstance(error.get("message"), str), response.text[:300]

            try:
                run()
            except Unsatisfiable:
                # No schema-breaking request exists for an operation without parameters.
                assert mode is GenerationMode.NEGATIVE, operation.path

    total = sum(cases.values())
    print(f"\nschemathesis: {total} cases in {time.monotonic() - started:.0f} s; statuses {dict(statuses)}")
    for name, count in sorted(cases.items()):
        print(f"  {count:5d} {name}")
    for name, spent in seconds.most_common(4):
        print(f"  {spent:6.1f} s in {name}")
    assert not failures, failures[:5]
    assert total >= MIN_CASES, (total, cases)
    assert statuses[200] > 50  # plenty of cases got through validation to the engine
    server.wait_idle()
