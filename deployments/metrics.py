"""Prometheus exposition for `GET /metrics`: our counters and vLLM's own metrics, per replica.

Our numbers are those of `/v1/ltr/stats` (labelled with the ingress replica that answered the scrape,
label `ingress`) and `/v1/ltr/engine_stats` (one sample per engine replica, label `replica`). vLLM's own
metrics (`vllm:` TTFT, TPOT, queue-time histograms, token counters, ...) come from each engine replica's
process registry as text and are re-emitted with a `replica` label, so the dashboards written for vLLM
read them per replica. Built fresh on each scrape from what was just gathered; the only state here is
`WaitHistogram`, which the ingress keeps for its predictor waits and their time in the replica.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

#: Families taken from an engine replica's registry (the rest there is the process's own collectors).
VLLM_PREFIX = "vllm:"

#: (section of an engine's debug stats, key, metric name, is a counter, help text)
ENGINE_METRICS: tuple[tuple[str, str, str, bool, str], ...] = (
    ("counters", "requests", "ltr_engine_requests", True, "requests this engine replica received"),
    ("counters", "scored", "ltr_engine_scored_requests", True, "received requests that carried a predicted score"),
    ("counters", "unscored", "ltr_engine_unscored_requests", True, "received requests without a score (FCFS order)"),
    ("counters", "aborted", "ltr_engine_aborted_requests", True, "requests aborted because the client went away"),
    ("counters", "failed", "ltr_engine_failed_requests", True, "requests that ended in an engine error"),
    ("counters", "followed_scores", "ltr_engine_followed_scores", True,
     "predictor scores that followed their request (sent ahead of its score) in time, passed to its scheduler"),
    ("counters", "late_scores", "ltr_engine_late_scores", True,
     "predictor scores that landed after their request was placed at the neutral score, passed to its scheduler"),
    ("counters", "finished_before_score", "ltr_engine_finished_before_score", True,
     "requests awaiting a predictor score (sent ahead of it, or placed without it) that finished before it landed"),
    ("counters", "released_unscored", "ltr_engine_released_unscored", True,
     "requests sent ahead of their score released to the neutral score: the score was late or failed"),
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
    ("scheduler", "followed_scores", "ltr_scheduler_followed_scores", True,
     "requests sent ahead of their score, ranked when it landed"),
    ("scheduler", "late_scores", "ltr_scheduler_late_scores", True, "requests re-ranked when their late score landed"),
    ("scheduler", "admitted_before_score", "ltr_scheduler_admitted_before_score", True,
     "requests admitted before their score landed, to a seat no other request waited for"),
    ("scheduler", "admitted_awaiting_score", "ltr_scheduler_admitted_awaiting_score", True,
     "requests admitted at the neutral score while their late score was still on its way"),
    ("scheduler", "max_waiting", "ltr_scheduler_max_waiting_requests", False, "most requests ever waiting at once"),
    ("scheduler", "max_running", "ltr_scheduler_max_running_requests", False, "most requests ever running at once"),
    ("scheduler", "schedule_s_total", "ltr_scheduler_schedule_seconds", True, "time spent in schedule()"),
    ("scheduler", "model_s_total", "ltr_scheduler_model_seconds", True, "time between schedule() and its output"),
)


class WaitHistogram:
    """Seconds from a predictor call to its answer, in time or late (Prometheus histogram buckets, upper
    bounds inclusive). Kept as plain counts so `/v1/ltr/stats` carries it and a benchmark can difference two
    snapshots: a run's own distribution."""

    BOUNDS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS_S) + 1)   # the last: above every bound (+Inf)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[next((i for i, bound in enumerate(self.BOUNDS_S) if seconds <= bound), len(self.BOUNDS_S))] += 1
        self.sum_s += seconds

    def snapshot(self) -> dict[str, Any]:
        """{"le": {bound: count in that bucket alone, ..., "+Inf": ...}, "sum_s", "count"}."""
        labels = [repr(bound) for bound in self.BOUNDS_S] + ["+Inf"]
        return {"le": dict(zip(labels, self.counts)), "sum_s": self.sum_s, "count": sum(self.counts)}


class _StatsCollector:
    """A one-shot collector over stats dicts already gathered by the ingress."""

    def __init__(self, ingress_replica: str, ingress: Mapping[str, Any], engines: Mapping[str, Mapping[str, Any]],
                 scrape_failures: int) -> None:
        self.ingress_replica = ingress_replica
        self.ingress = ingress
        self.engines = engines
        self.scrape_failures = scrape_failures

    def collect(self) -> Iterator[Metric]:
        me = self.ingress_replica
        requests = CounterMetricFamily("ltr_ingress_requests", "requests the ingress handled, by kind",
                                       labels=["ingress", "kind"])
        for kind, count in sorted(self.ingress.get("requests", {}).items()):
            requests.add_metric([me, kind], count)
        yield requests
        fallbacks = CounterMetricFamily("ltr_predictor_fallbacks", "requests the predictor did not score, "
                                        "by reason", labels=["ingress", "reason"])
        for reason, count in sorted(self.ingress.get("predictor_fallbacks", {}).items()):
            fallbacks.add_metric([me, reason], count)
        yield fallbacks
        late = CounterMetricFamily("ltr_predictor_late_answer_outcomes", "late predictor answers (after a timeout) "
                                   "by outcome at the ingress: landed, failed, overdue (not landed "
                                   "breaker_late_answer_s after the call; counted again if it lands later); "
                                   "calls no replica had taken at the timeout, cancelled once taken: "
                                   "assigned_late, assignment_failed, unassigned",
                                   labels=["ingress", "outcome"])
        for outcome, count in sorted(self.ingress.get("late_answers", {}).items()):
            late.add_metric([me, outcome], count)
        yield late
        for key, name, help_text in (
                ("predictor_wait_s", "ltr_predictor_wait_seconds",
                 "seconds from a predictor call to its answer at the ingress, in time or late"),
                ("predictor_replica_s", "ltr_predictor_replica_seconds",
                 "seconds of each answered predictor call spent in the predictor replica (forward pass)")):
            waits = self.ingress.get(key)
            if waits:
                histogram = HistogramMetricFamily(name, help_text, labels=["ingress"])
                cumulative, buckets = 0, []
                for bound, count in waits["le"].items():
                    cumulative += count
                    buckets.append((bound, cumulative))
                histogram.add_metric([me], buckets, waits["sum_s"])
                yield histogram
        gauges = (
            (CounterMetricFamily, "ltr_neutral_placements", "unscored requests placed at the neutral score "
             "(median of recent predictions) instead of ahead of ranked work", self.ingress.get("neutral_placements", 0)),
            (CounterMetricFamily, "ltr_predictor_late_answers_sent", "unscored requests sent on with the predictor's "
             "answer following them (re-ranked in their engine when it lands)", self.ingress.get("late_sent", 0)),
            (CounterMetricFamily, "ltr_requests_sent_ahead_of_score", "requests sent to an engine before their "
             "predictor score was in (send_before_score); the score follows them", self.ingress.get("sent_ahead", 0)),
            (GaugeMetricFamily, "ltr_predictor_breaker_open", "1 while the predictor circuit breaker is open",
             float(bool(self.ingress.get("breaker_open")))),
            (CounterMetricFamily, "ltr_predictor_breaker_openings", "times the predictor circuit breaker opened "
             "(breaker_failures failures in a row)", self.ingress.get("breaker_openings", 0)),
            (GaugeMetricFamily, "ltr_ingress_in_flight_requests", "generation requests this ingress holds now "
             "(bounded by max_queued_requests; one more is answered 429)", self.ingress.get("in_flight", 0)),
            (GaugeMetricFamily, "ltr_metrics_scrape_failures", "engine replica calls of this scrape that failed "
             "or timed out (their replicas are missing from it)", self.scrape_failures),
        )
        for family_cls, name, help_text, value in gauges:
            family = family_cls(name, help_text, labels=["ingress"])
            family.add_metric([me], value)
            yield family
        for section, key, name, is_counter, help_text in ENGINE_METRICS:
            family_cls = CounterMetricFamily if is_counter else GaugeMetricFamily
            family = family_cls(name, help_text, labels=["replica"])
            for replica, stats in sorted(self.engines.items()):
                value = (stats.get(section) or {}).get(key) if section else stats.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family.add_metric([replica], value)
            yield family
        yield from self._live_quality()

    def _live_quality(self) -> Iterator[Metric]:
        """The rank scheduler's rolling censor-aware tau (`ltr.predictor.live_quality`), per engine replica
        and predictor version; tau only once the window holds a pair of known order."""
        labels = ["replica", "predictor_version"]
        tau = GaugeMetricFamily("ltr_live_kendall_tau", "Kendall tau of predicted score vs output tokens over "
                                "this replica's last finished requests (censor-aware)", labels=labels)
        window = GaugeMetricFamily("ltr_live_tau_window_requests", "finished requests in the live tau window",
                                   labels=labels)
        censored = GaugeMetricFamily("ltr_live_tau_censored_requests", "of which cut at max_tokens or aborted "
                                     "(their length is a lower bound)", labels=labels)
        for replica, stats in sorted(self.engines.items()):
            versions = ((stats.get("scheduler") or {}).get("live_quality") or {}).get("versions") or {}
            for version, snapshot in versions.items():
                if snapshot.get("kendall_tau") is not None:
                    tau.add_metric([replica, version], snapshot["kendall_tau"])
                window.add_metric([replica, version], snapshot.get("n", 0))
                censored.add_metric([replica, version], snapshot.get("censored", 0))
        yield from (tau, window, censored)


class _VLLMCollector:
    """vLLM's metric families of every engine replica, merged into one family per name with a `replica`
    label (a replica's text that does not parse is left out, like a replica that did not answer)."""

    def __init__(self, texts: Mapping[str, str]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            try:
                families = [f for f in text_string_to_metric_families(text) if f.name.startswith(VLLM_PREFIX)]
            except ValueError:
                continue
            for family in families:
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(family.name, family.documentation, family.type,
                                                          family.unit)
                target.samples.extend(sample._replace(labels={**sample.labels, "replica": replica})
                                      for sample in family.samples)
        yield from merged.values()


class _CollectorsView:
    """Collects the given collectors only."""

    def __init__(self, collectors: list[Any]) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def vllm_registry_text(registry: CollectorRegistry = REGISTRY) -> str:
    """vLLM's own metrics in `registry` (the process's default one, where vLLM's Prometheus stat logger
    registers them), in text format. Only collectors whose every name is vLLM's are collected: collecting
    the whole default registry of a Serve engine replica was seen blocking its event loop for 10 s."""
    with registry._lock:   # prometheus_client has no public listing of a registry's collectors
        collectors = [collector for collector, names in registry._collector_to_names.items()
                      if names and all(name.startswith(VLLM_PREFIX) for name in names)]
    view = CollectorRegistry(auto_describe=False)
    view.register(_CollectorsView(collectors))
    return generate_latest(view).decode()


def prometheus_text(ingress_replica: str, ingress: Mapping[str, Any], engines: Mapping[str, Mapping[str, Any]],
                    vllm_texts: Mapping[str, str] | None = None, scrape_failures: int = 0) -> bytes:
    """Prometheus text format for one ingress replica's stats, the per-replica engine debug stats, and the
    engine replicas' own vLLM metrics (`{replica: registry text}`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(ingress_replica, ingress, engines, scrape_failures))
    registry.register(_VLLMCollector(vllm_texts or {}))
    return generate_latest(registry)
