"""The engine deployment's request router, on Serve's own call shape (no cluster needed)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from deployments.router import LeastWorkRouter


def _replica(name: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name), routing_stats={})


def _router() -> LeastWorkRouter:
    router = LeastWorkRouter.__new__(LeastWorkRouter)   # Serve builds it; the rule needs no Serve state
    router.initialize_state(seed=0)
    return router


def _pending(request_id: str, *args) -> SimpleNamespace:
    return SimpleNamespace(args=args, kwargs={}, metadata=SimpleNamespace(internal_request_id=request_id),
                           routing_context=SimpleNamespace(should_backoff=False))


def _choose(router: LeastWorkRouter, replicas: list, *args, request_id: str = "r") -> list[list[str]]:
    pending = _pending(request_id, *args)
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    # Serve backs off between rounds that found no replica only when the router asks it to; without it a
    # round of full or slow replicas is retried at once, forever (a busy loop of queue-length probes).
    assert pending.routing_context.should_backoff is True
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_ordinary_requests_rank_every_replica_least_work_first() -> None:
    router, replicas = _router(), [_replica("a"), _replica("b")]
    router._in_flight["x"] = SimpleNamespace(replica_id=replicas[0].replica_id, work=500.0, at=0.0)
    ranks = _choose(router, replicas, SimpleNamespace(predicted_work=10.0))
    assert ranks == [["b"], ["a"]]   # the busy replica stays as a fallback rank


def test_a_burst_chosen_before_any_replica_answers_is_spread_by_work() -> None:
    """Serve routes a request only once its replica accepts it; a burst chooses before any has."""
    router, replicas = _router(), [_replica("a"), _replica("b")]
    replicas[0].routing_stats = {"outstanding_work": 100.0, "num_requests": 1, "timestamp": time.time()}
    replicas[1].routing_stats = {"outstanding_work": 0.0, "num_requests": 0, "timestamp": time.time()}
    firsts = [_choose(router, replicas, SimpleNamespace(predicted_work=60.0), request_id=f"r{i}")[0][0]
              for i in range(6)]
    # b: 0 -> 60 -> 120 ...; a: 100 -> 160 ...: each choice counts the ones before it.
    assert firsts == ["b", "b", "a", "b", "a", "b"], firsts
    loads = {load.replica_id: load.outstanding_work for load in router.replica_loads(replicas)}
    assert loads == {"a": 100.0 + 2 * 60.0, "b": 4 * 60.0}


def test_a_chosen_request_counts_once_whether_waiting_routed_or_chosen_again() -> None:
    router, replicas = _router(), [_replica("a"), _replica("b")]
    for replica, reported in zip(replicas, (10.0, 30.0)):
        replica.routing_stats = {"outstanding_work": reported, "num_requests": 1, "timestamp": time.time()}
    work = SimpleNamespace(predicted_work=50.0)

    def loads() -> dict[str, float]:
        return {load.replica_id: load.outstanding_work for load in router.replica_loads(replicas)}

    assert _choose(router, replicas, work, request_id="r")[0] == ["a"]
    assert loads() == {"a": 60.0, "b": 30.0}                  # chosen, waiting for the replica's answer
    # A later round (the replica was full) weighs the loads without this request's own earlier choice.
    assert _choose(router, replicas, work, request_id="r")[0] == ["a"]
    assert loads() == {"a": 60.0, "b": 30.0}
    router.on_request_routed(_pending("r", work), replicas[1].replica_id, result=None)
    assert loads() == {"a": 10.0, "b": 80.0}                  # where Serve sent it, not where it was chosen
    router.on_request_completed(replicas[1].replica_id, "r")
    assert loads() == {"a": 10.0, "b": 30.0}
    _choose(router, replicas, work, request_id="cancelled")   # never answered: kept only while fresh
    router._chosen["cancelled"].at -= router._stats_staleness_s + 1
    assert loads() == {"a": 10.0, "b": 30.0}


def test_work_a_report_counted_of_a_request_finished_since_is_not_counted_again() -> None:
    """A report is up to a period old: one taken while a long request ran must not outlive the request."""
    router, replicas = _router(), [_replica("a"), _replica("b")]
    long_request = SimpleNamespace(predicted_work=1000.0, request_id="cmpl-long")
    router.on_request_routed(_pending("long", long_request), replicas[0].replica_id, result=None)
    replicas[0].routing_stats = {"outstanding_work": 1000.0, "num_requests": 2, "timestamp": time.time(),
                                 "remaining_work_by_request": {"cmpl-long": 990.0, "cmpl-other": 10.0}}
    replicas[1].routing_stats = {"outstanding_work": 50.0, "num_requests": 1, "timestamp": time.time(),
                                 "remaining_work_by_request": {"cmpl-elsewhere": 50.0}}
    assert _choose(router, replicas, SimpleNamespace(predicted_work=5.0), request_id="before")[0] == ["b"]
    router.on_request_completed(replicas[1].replica_id, "before")     # (never routed: nothing finished)
    router.on_request_completed(replicas[0].replica_id, "long")
    loads = {load.replica_id: (load.outstanding_work, load.queue_len) for load in router.replica_loads(replicas)}
    assert loads == {"a": (10.0, 1), "b": (50.0, 1)}
    assert _choose(router, replicas, SimpleNamespace(predicted_work=5.0), request_id="after")[0] == ["a"]
