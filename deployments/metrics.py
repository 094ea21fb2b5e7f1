"""Prometheus exposition of the ingress's and every engine replica's debug counters (`GET /metrics`).

The same numbers as `/v1/ltr/stats` and `/v1/ltr/engine_stats`, in the format a Prometheus scraper reads,
one sample per engine replica (label `replica`). Built fresh on each scrape from the stats just gathered,
so nothing here keeps state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: (section of an engine's debug stats, key, metric name, is a counter, help text)
ENGINE_METRICS: tuple[tuple[str, str, str, bool, str], ...] = (
    ("counters", "requests", "ltr_engine_requests", True, "requests this engine replica received"),
    ("counters", "scored", "ltr_engine_scored_requests", True, "received requests that carried a predicted score"),
    ("counters", "unscored", "ltr_engine_unscored_requests", True, "received requests without a score (FCFS order)"),
    ("counters", "aborted", "ltr_engine_aborted_requests", True, "requests aborted because the client went away"),
    ("counters", "failed", "ltr_engine_failed_requests", True, "requests that ended in an engine error"),
    ("counters", "late_scores", "ltr_engine_late_scores", True,
     "predictor scores that landed after their request entered this replica, passed to its scheduler"),
    ("", "in_flight", "ltr_engine_in_flight_requests", False, "requests this replica holds now"),
    ("", "outstanding_work", "ltr_engine_outstanding_work_tokens", False,
     "predicted decode tokens still to come on this replica (what the least-work router reads)"),
    ("engine_core", "running", "ltr_engine_core_running_requests", False, "running requests in the engine core"),
    ("engine_core", "waiting", "ltr_engine_core_waiting_requests", False, "waiting requests in the engine core"),
    ("engine_core", "kv_cache_usage", "ltr_engine_core_kv_cache_usage_ratio", False, "share of KV-cache blocks in use"),
    ("scheduler", "steps", "ltr_scheduler_steps", True, "engine iterations the rank scheduler scheduled"),
    ("scheduler", "promotions", "ltr_scheduler_promotions", True, "starvation promotions"),
    ("scheduler", "rank_preemptions", "ltr_scheduler_rank_preemptions", True,
     "running requests evicted for better-ranked waiting ones"),
    ("scheduler", "kv_preemptions", "ltr_scheduler_kv_preemptions", True, "requests evicted for lack of KV blocks"),
    ("scheduler", "late_scores", "ltr_scheduler_late_scores", True, "requests re-ranked when their late score landed"),
    ("scheduler", "max_waiting", "ltr_scheduler_max_waiting_requests", False, "most requests ever waiting at once"),
    ("scheduler", "max_running", "ltr_scheduler_max_running_requests", False, "most requests ever running at once"),
    ("scheduler", "schedule_s_total", "ltr_scheduler_schedule_seconds", True, "time spent in schedule()"),
    ("scheduler", "model_s_total", "ltr_scheduler_model_seconds", True, "time between schedule() and its output"),
)


class _StatsCollector:
    """A one-shot collector over stats dicts already gathered by the ingress."""

    def __init__(self, ingress: Mapping[str, Any], engines: Mapping[str, Mapping[str, Any]]) -> None:
        self.ingress = ingress
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("ltr_ingress_requests", "requests the ingress handled, by kind",
                                       labels=["kind"])
        for kind, count in sorted(self.ingress.get("requests", {}).items()):
            requests.add_metric([kind], count)
        yield requests
        fallbacks = CounterMetricFamily("ltr_predictor_fallbacks", "requests the predictor did not score, "
                                        "by reason", labels=["reason"])
        for reason, count in sorted(self.ingress.get("predictor_fallbacks", {}).items()):
            fallbacks.add_metric([reason], count)
        yield fallbacks
        yield CounterMetricFamily("ltr_neutral_placements", "unscored requests placed at the neutral score "
                                  "(median of recent predictions) instead of ahead of ranked work",
                                  value=self.ingress.get("neutral_placements", 0))
        yield GaugeMetricFamily("ltr_predictor_breaker_open", "1 while the predictor circuit breaker is open",
                                value=float(bool(self.ingress.get("breaker_open"))))
        for section, key, name, is_counter, help_text in ENGINE_METRICS:
            family_cls = CounterMetricFamily if is_counter else GaugeMetricFamily
            family = family_cls(name, help_text, labels=["replica"])
            for replica, stats in sorted(self.engines.items()):
                value = (stats.get(section) or {}).get(key) if section else stats.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family.add_metric([replica], value)
            yield family


def prometheus_text(ingress: Mapping[str, Any], engines: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Prometheus text format for the ingress stats and the per-replica engine debug stats."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(ingress, engines))
    return generate_latest(registry)
