"""The engine deployment's request router, on Serve's own call shape (no cluster needed)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from deployments.router import LeastWorkRouter


def _replica(name: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name), routing_stats={})


def _router() -> LeastWorkRouter:
    router = LeastWorkRouter.__new__(LeastWorkRouter)   # Serve builds it; the rule needs no Serve state
    router.initialize_state(seed=0)
    return router


def _choose(router: LeastWorkRouter, replicas: list, *args) -> list[list[str]]:
    pending = SimpleNamespace(args=args, kwargs={}, routing_context=SimpleNamespace(should_backoff=False))
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    # Serve backs off between rounds that found no replica only when the router asks it to; without it a
    # round of full or slow replicas is retried at once, forever (a busy loop of queue-length probes).
    assert pending.routing_context.should_backoff is True
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_ordinary_requests_rank_every_replica_least_work_first() -> None:
    router, replicas = _router(), [_replica("a"), _replica("b")]
    router._in_flight["x"] = SimpleNamespace(replica_id=replicas[0].replica_id, work=500.0, routed_at=0.0)
    ranks = _choose(router, replicas, SimpleNamespace(predicted_work=10.0))
    assert ranks == [["b"], ["a"]]   # the busy replica stays as a fallback rank
