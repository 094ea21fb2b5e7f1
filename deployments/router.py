"""Least-predicted-work request router for the engine deployment.

Ray Serve's default router (power of two choices) balances queue *lengths*; with LLM requests whose
output lengths differ by 100x, equal queue lengths can hide very unequal amounts of work. This
router sends each request to the replica holding the least predicted outstanding work, using:

- the request's own predicted work (`EngineRequest.predicted_work`, carried in the handle call's
  arguments: the router sees them as `PendingRequest.args`);
- each replica's reported remaining work (`record_routing_stats`, pushed through the controller every
  `request_routing_stats_period_s`), plus the work this router sent it since that report;
- the work this router has *chosen* for a replica that has not yet answered whether it accepts it: Serve
  asks the replica before it reports the request as routed, and a burst chooses in that gap, so without
  this every request of a burst saw the same loads and went to the same replica;
- less what the report counted of requests this router sent there that finished since (the report lists
  each request's remaining work): a report is up to a period old, and one taken before a long request
  ended made its replica look busy for that long;
- when a replica's report is missing or older than `stats_staleness_s`, the work this router alone
  has in flight on it (exact for a single ingress, a lower bound with several).

The choice itself is the shared pure rule `ltr.routing.choose_replica("least_work", ...)`; the
remaining replicas follow as fallback ranks, so a full replica never blocks routing. (Debug calls that
must reach every replica do not come here: the ingress uses Serve's `broadcast`.)
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ltr.routing import ReplicaLoad, choose_replica, request_work

logger = logging.getLogger("ray.serve")

#: Keys of the dict an engine replica returns from `record_routing_stats`.
STAT_OUTSTANDING_WORK = "outstanding_work"
STAT_REMAINING_BY_REQUEST = "remaining_work_by_request"   # EngineRequest.request_id -> its part of the work
STAT_NUM_REQUESTS = "num_requests"
STAT_TIMESTAMP = "timestamp"


def _argument_attribute(pending_request: PendingRequest | None, name: str,
                        accept: Callable[[Any], bool]) -> Any:
    """The first accepted value of attribute `name` among a request's arguments, or None.

    Read by attribute, not isinstance: Serve ships the router class to the caller by value, so the
    classes it sees are not the ones the ingress imported.
    """
    if pending_request is not None:
        for arg in chain(pending_request.args, pending_request.kwargs.values()):
            value = getattr(arg, name, None)
            if accept(value):
                return value
    return None


def predicted_work_of(pending_request: PendingRequest | None) -> float:
    """The predicted work carried by a request's arguments (default work when none carries it)."""
    work = _argument_attribute(pending_request, "predicted_work",
                               lambda v: isinstance(v, (int, float)) and v >= 0)
    return request_work(None, 0) if work is None else float(work)


def request_id_of(pending_request: PendingRequest | None) -> str | None:
    """The ingress's id of a request (`EngineRequest.request_id`), by which a replica's report lists it."""
    return _argument_attribute(pending_request, "request_id", lambda value: isinstance(value, str))


@dataclass
class _InFlight:
    replica_id: ReplicaID
    work: float
    request_id: str | None   # `EngineRequest.request_id`, by which the replica's report lists its work
    #: When it was routed (in flight) or chosen (awaiting the replica's answer).
    at: float


class LeastWorkRouter(RequestRouter):
    """Routes to the replica with the least predicted outstanding work (see module docstring)."""

    def initialize_state(self, stats_staleness_s: float = 5.0, seed: int | None = None) -> None:
        """Serve (2.60) calls this right after building the router, with the deployment's router kwargs or none."""
        if stats_staleness_s <= 0:
            raise ValueError(f"stats_staleness_s must be > 0, got {stats_staleness_s}")
        self._stats_staleness_s = float(stats_staleness_s)
        self._rng = random.Random(seed)
        self._in_flight: dict[str, _InFlight] = {}
        #: Requests chosen for a replica that has not yet accepted them (a later round's choice replaces
        #: the earlier one; dropped once routed or completed, or after `stats_staleness_s` if cancelled).
        self._chosen: dict[str, _InFlight] = {}
        #: Requests this router sent that finished in the last `stats_staleness_s`: replica unique id ->
        #: request id -> when it finished.
        self._finished: dict[str, dict[str, float]] = {}

    def replica_loads(self, candidates: list[RunningReplica]) -> list[ReplicaLoad]:
        """Current outstanding-work estimate for every candidate replica."""
        now = time.time()
        for key in [k for k, f in self._chosen.items() if now - f.at > self._stats_staleness_s]:
            del self._chosen[key]
        for finished in self._finished.values():
            for rid in [rid for rid, at in finished.items() if now - at > self._stats_staleness_s]:
                del finished[rid]
        loads = []
        for replica in candidates:
            mine = [f for f in self._in_flight.values() if f.replica_id == replica.replica_id]
            chosen = [f for f in self._chosen.values() if f.replica_id == replica.replica_id]
            stats: dict[str, Any] = replica.routing_stats or {}
            stamp = stats.get(STAT_TIMESTAMP)
            reported = stats.get(STAT_OUTSTANDING_WORK)
            fresh = (isinstance(stamp, (int, float)) and isinstance(reported, (int, float))
                     and now - float(stamp) <= self._stats_staleness_s)
            if fresh:
                # The report already covers what was routed before it was taken, and what finished after.
                remaining = stats.get(STAT_REMAINING_BY_REQUEST) or {}
                gone = [remaining[rid] for rid, at in self._finished.get(replica.replica_id.unique_id, {}).items()
                        if at > float(stamp) and rid in remaining]
                work = max(float(reported) - sum(gone), 0.0) + sum(f.work for f in mine if f.at > float(stamp))
                queue = (max(int(stats.get(STAT_NUM_REQUESTS, 0)) - len(gone), 0)
                         + sum(1 for f in mine if f.at > float(stamp)))
            else:
                work = sum(f.work for f in mine)
                queue = len(mine)
            # Not yet at the replica, so no report covers them.
            work += sum(f.work for f in chosen)
            queue += len(chosen)
            loads.append(ReplicaLoad(replica_id=replica.replica_id.unique_id, queue_len=queue,
                                     outstanding_work=work))
        return loads

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Serve sleeps between rounds in which no replica took the request only when the router says so
            # (its own locality and multiplex rules do; a custom router that does not spins: a busy loop of
            # queue-length probes that starved a 2-core box in CI; ray-project/ray PRs 63238, 66051).
            pending_request.routing_context.should_backoff = True
            # A later round re-chooses for this request: its earlier choice must not weigh on it.
            self._chosen.pop(pending_request.metadata.internal_request_id, None)
        loads = self.replica_loads(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        best = choose_replica("least_work", loads, self._rng)
        if pending_request is not None:
            self._chosen[pending_request.metadata.internal_request_id] = _InFlight(
                replica_id=by_id[best.replica_id].replica_id, work=predicted_work_of(pending_request),
                request_id=request_id_of(pending_request), at=time.time())
        rest = sorted((load for load in loads if load.replica_id != best.replica_id),
                      key=lambda load: (load.outstanding_work, load.queue_len))
        return [[by_id[best.replica_id]]] + [[by_id[load.replica_id]] for load in rest]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._chosen.pop(pending_request.metadata.internal_request_id, None)
        self._in_flight[pending_request.metadata.internal_request_id] = _InFlight(
            replica_id=replica_id, work=predicted_work_of(pending_request),
            request_id=request_id_of(pending_request), at=time.time())

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        done = self._in_flight.pop(internal_request_id, None)
        if done is not None and done.request_id is not None:
            self._finished.setdefault(replica_id.unique_id, {})[done.request_id] = time.time()
        self._chosen.pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for tracked in (self._in_flight, self._chosen):
            for key in [k for k, f in tracked.items() if f.replica_id == replica_id]:
                del tracked[key]
        self._finished.pop(replica_id.unique_id, None)
