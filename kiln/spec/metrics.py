"""Prometheus view of the engine's SpeculationStats, read at scrape time:

    kiln_spec_decode_num_draft_tokens_total     proposed tokens
    kiln_spec_decode_num_accepted_tokens_total  accepted proposals
    kiln_spec_decode_num_verify_rows_total      verify rows (one per request per step)
    kiln_spec_decode_acceptance_length          histogram: tokens a verify row emitted
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from kiln.spec.decoder import SpeculationStats


class SpeculationCollector:
    def __init__(self, stats: Callable[[], SpeculationStats | None]) -> None:
        self._stats = stats

    def describe(self):
        return []

    def collect(self):
        stats = self._stats()
        if stats is None:
            return
        yield CounterMetricFamily("kiln_spec_decode_num_draft_tokens", "Proposed tokens",
                                  value=stats.num_proposed_tokens)
        yield CounterMetricFamily("kiln_spec_decode_num_accepted_tokens",
                                  "Proposed tokens the target accepted",
                                  value=stats.num_accepted_tokens)
        yield CounterMetricFamily("kiln_spec_decode_num_verify_rows",
                                  "Rows that verified proposals", value=stats.num_verify_rows)
        buckets, cumulative, total = [], 0, 0
        for accepted, count in enumerate(stats.accepted_length_counts):
            cumulative += count
            total += count * (accepted + 1)
            buckets.append((str(float(accepted + 1)), cumulative))
        buckets.append(("+Inf", cumulative))
        yield HistogramMetricFamily("kiln_spec_decode_acceptance_length",
                                    "Tokens emitted per verify row (accepted + 1)",
                                    buckets=buckets, sum_value=total)


_COUNTERS = {"kiln_spec_decode_num_draft_tokens_total": "proposed",
             "kiln_spec_decode_num_accepted_tokens_total": "accepted",
             "kiln_spec_decode_num_verify_rows_total": "verify_rows"}


def scrape_speculation_counters(base_url: str, headers: dict) -> dict[str, float] | None:
    """The server's speculation counters from /metrics (None: it does not speculate or
    cannot be read), for `kiln bench serve` to report acceptance per load point."""
    import httpx

    try:
        text = httpx.get(f"{base_url.rstrip('/')}/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _COUNTERS:
            found[_COUNTERS[name]] = float(value)
    return found if len(found) == len(_COUNTERS) else None


def speculation_delta(before: dict | None, after: dict | None) -> dict[str, float]:
    """Acceptance rate and mean accepted length between two scrapes ({} without both)."""
    if before is None or after is None:
        return {}
    proposed = after["proposed"] - before["proposed"]
    accepted = after["accepted"] - before["accepted"]
    rows = after["verify_rows"] - before["verify_rows"]
    return {"spec_acceptance_rate": accepted / proposed if proposed else 0.0,
            "spec_mean_accepted_length": 1 + accepted / rows if rows else 0.0}
