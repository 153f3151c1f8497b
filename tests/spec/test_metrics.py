"""/metrics shows the engine's speculation counts; bench serve turns two scrapes into an
acceptance rate."""

from __future__ import annotations

from types import SimpleNamespace

from kiln.serve.metrics import ServerMetrics
from kiln.spec.decoder import SpeculationStats
from kiln.spec.metrics import speculation_delta


def test_prometheus_counters_and_acceptance_length_histogram():
    stats = SpeculationStats(num_verify_rows=3, num_proposed_tokens=12, num_accepted_tokens=5)
    stats.accepted_length_counts[0] = 1  # emitted 1
    stats.accepted_length_counts[1] = 1  # emitted 2
    stats.accepted_length_counts[4] = 1  # emitted 5
    scheduler = SimpleNamespace(num_running=0, num_waiting=0, speculation_stats=stats,
                                kv_cache_manager=SimpleNamespace(usage=0.0))
    text = ServerMetrics("m", lambda: scheduler).render().decode()
    assert "kiln_spec_decode_num_draft_tokens_total 12.0" in text
    assert "kiln_spec_decode_num_accepted_tokens_total 5.0" in text
    assert "kiln_spec_decode_num_verify_rows_total 3.0" in text
    assert 'kiln_spec_decode_acceptance_length_bucket{le="1.0"} 1.0' in text
    assert 'kiln_spec_decode_acceptance_length_bucket{le="2.0"} 2.0' in text
    assert 'kiln_spec_decode_acceptance_length_bucket{le="5.0"} 3.0' in text
    assert "kiln_spec_decode_acceptance_length_sum 8.0" in text
    # An engine without speculation shows none of them.
    scheduler.speculation_stats = None
    assert "kiln_spec_decode" not in ServerMetrics("m", lambda: scheduler).render().decode()


def test_speculation_delta():
    before = {"proposed": 10.0, "accepted": 4.0, "verify_rows": 5.0}
    after = {"proposed": 30.0, "accepted": 19.0, "verify_rows": 10.0}
    assert speculation_delta(before, after) == {"spec_acceptance_rate": 0.75,
                                                "spec_mean_accepted_length": 4.0}
    assert speculation_delta(None, after) == {}
