"""Prometheus metrics of one server (its own registry, so several apps in one process, as in
the tests, do not collide).

Gauges are read from the engine when /metrics is scraped; counters and histograms are fed
by the request handlers as requests stream and finish.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kiln.runtime.request_output import RequestOutput
from kiln.runtime.scheduler import Scheduler

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1,
                 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str, scheduler: Callable[[], Scheduler | None]) -> None:
        self.registry = registry = CollectorRegistry()
        self._scheduler = scheduler
        labels = ["model_name"]

        def gauge(name: str, text: str, read: Callable[[Scheduler], float]) -> None:
            def value() -> float:
                current = scheduler()
                return float(read(current)) if current is not None else 0.0

            Gauge(name, text, registry=registry).set_function(value)

        gauge("kiln_num_requests_running", "Sequences in the running batch",
              lambda s: s.num_running)
        gauge("kiln_num_requests_waiting", "Sequences waiting (preempted ones included)",
              lambda s: s.num_waiting)
        gauge("kiln_kv_cache_usage_perc", "KV cache blocks in use, percent",
              lambda s: 100.0 * s.kv_cache_manager.usage)
        Gauge("kiln_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / all "
              "prompt tokens, over finished requests", registry=registry).set_function(self._hit_rate)

        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of finished requests",
                                     labels, registry=registry).labels(model_name)
        self.cached_prompt_tokens = Counter(
            "kiln_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache",
            labels, registry=registry).labels(model_name)
        self.generation_tokens = Counter("kiln_generation_tokens", "Generated tokens",
                                         labels, registry=registry).labels(model_name)
        self.preemptions = Counter("kiln_num_preemptions", "Preemptions of finished requests",
                                   labels, registry=registry).labels(model_name)
        self.request_success = Counter("kiln_request_success", "Finished sequences",
                                       ["model_name", "finished_reason"], registry=registry)
        self.rejected = Counter("kiln_requests_rejected", "Requests answered 503 (queue full, "
                                "draining or not ready)", labels, registry=registry).labels(model_name)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Time to first token",
                              labels, buckets=_LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.itl = Histogram("kiln_inter_token_latency_seconds", "Time between streamed tokens",
                             labels, buckets=_ITL_BUCKETS, registry=registry).labels(model_name)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "Arrival to finish",
                             labels, buckets=_LATENCY_BUCKETS, registry=registry).labels(model_name)
        # The server side of TTFT, per phase (`kiln bench serve` reports their deltas).
        self.queue_time = Histogram("kiln_request_queue_time_seconds",
                                    "Arrival to first scheduled (waiting for a step)", labels,
                                    buckets=PHASE_BUCKETS, registry=registry).labels(model_name)
        self.prefill_time = Histogram("kiln_request_prefill_time_seconds",
                                      "First scheduled to first token (the prefill, all its "
                                      "chunks)", labels, buckets=PHASE_BUCKETS,
                                      registry=registry).labels(model_name)
        self._model_name = model_name
        from kiln.spec.metrics import SpeculationCollector  # speculative decoding's counts
        registry.register(SpeculationCollector(lambda: getattr(scheduler(), "speculation_stats", None)))
        # Plain totals for the hit-rate gauge (prometheus counters are write-only).
        self._prompt_total = 0
        self._cached_total = 0

    def _hit_rate(self) -> float:
        return self._cached_total / self._prompt_total if self._prompt_total else 0.0

    def observe_finished(self, output: RequestOutput) -> None:
        """Count a finished (or aborted) request: tokens, preemptions, latencies."""
        prompt_len = len(output.prompt_token_ids)
        cached = min(output.num_cached_tokens, prompt_len)
        self.prompt_tokens.inc(prompt_len)
        self.cached_prompt_tokens.inc(cached)
        self._prompt_total += prompt_len
        self._cached_total += cached
        for completion, metrics in zip(output.outputs, output.metrics):
            self.generation_tokens.inc(len(completion.token_ids))
            self.preemptions.inc(metrics.num_preemptions)
            self.request_success.labels(self._model_name, completion.finish_reason or "abort").inc()
            if metrics.first_token_time is not None:
                self.ttft.observe(max(0.0, metrics.first_token_time - metrics.arrival_time))
                if metrics.first_scheduled_time is not None:
                    self.queue_time.observe(
                        max(0.0, metrics.first_scheduled_time - metrics.arrival_time))
                    self.prefill_time.observe(
                        max(0.0, metrics.first_token_time - metrics.first_scheduled_time))
            if metrics.finished_time is not None:
                self.e2e.observe(max(0.0, metrics.finished_time - metrics.arrival_time))

    def render(self) -> bytes:
        return generate_latest(self.registry)
