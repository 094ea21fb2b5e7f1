"""Discrete-event loop over many replicas: arrivals are routed with ltr.routing, replicas step on their own clocks."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ltr.routing import ReplicaLoad, RouterName, choose_replica, request_work
from ltr.scheduling.policy import PolicyConfig
from ltr.sim.profile import HardwareProfile
from ltr.sim.replica import Replica, SimSeq, StepShape, new_seq
from ltr.sim.workload import SimRequest


@dataclass(frozen=True)
class RequestRecord:
    """Outcome of one request."""

    request_id: str
    replica: int
    arrival: float
    first_token: float
    finish: float
    prompt_len: int
    output_len: int
    generated: int
    preemptions: int
    max_idle_steps: int

    @property
    def latency(self) -> float:
        return self.finish - self.arrival

    @property
    def per_token_latency(self) -> float:
        return self.latency / self.output_len

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival


@dataclass
class SimResult:
    records: list[RequestRecord]
    makespan: float
    steps: list[int]
    kv_preemptions: int
    rank_preemptions: int
    promotions: int
    #: Requests routed to each replica.
    routed: list[int] = field(default_factory=list)
    #: Every step's shape, replica by replica (only with `record_shapes`): batch composition.
    shapes: list[StepShape] = field(default_factory=list)

    def summary(self, long_threshold: int | None = None) -> dict[str, float]:
        """Latency statistics; per-token latency = latency / output tokens (the paper's metric)."""
        return summarize(self.records, self.makespan, long_threshold) | {
            "kv_preemptions": self.kv_preemptions, "rank_preemptions": self.rank_preemptions,
            "promotions": self.promotions, "steps": int(sum(self.steps)),
        }

    def completed_by(self, budget_s: float) -> int:
        """How many requests finished within `budget_s` of the first arrival (synthetic-data metric)."""
        start = min((r.arrival for r in self.records), default=0.0)
        return sum(1 for r in self.records if r.finish - start <= budget_s)


def summarize(records: Sequence[RequestRecord], makespan: float,
              long_threshold: int | None = None) -> dict[str, float]:
    if not records:
        raise ValueError("no completed requests to summarize")
    lat = np.array([r.latency for r in records])
    ptl = np.array([r.per_token_latency for r in records])
    ttft = np.array([r.ttft for r in records])
    out = {
        "n": len(records),
        "mean_latency": float(lat.mean()), "p50_latency": float(np.percentile(lat, 50)),
        "p90_latency": float(np.percentile(lat, 90)), "p99_latency": float(np.percentile(lat, 99)),
        "mean_per_token_latency": float(ptl.mean()), "p90_per_token_latency": float(np.percentile(ptl, 90)),
        "mean_ttft": float(ttft.mean()), "makespan": float(makespan),
        "throughput_tok_s": float(sum(r.output_len for r in records) / makespan) if makespan > 0 else 0.0,
    }
    if long_threshold is not None:
        long_lat = [r.latency for r in records if r.output_len >= long_threshold]
        short_lat = [r.latency for r in records if r.output_len < long_threshold]
        if long_lat:
            out["long_p99_latency"] = float(np.percentile(long_lat, 99))
            out["long_mean_latency"] = float(np.mean(long_lat))
        if short_lat:
            out["short_mean_latency"] = float(np.mean(short_lat))
    return out


@dataclass(frozen=True)
class ClusterConfig:
    """How many replicas and which router; the policy runs inside every replica."""

    num_replicas: int = 1
    router: RouterName = "least_work"
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.router not in ("least_work", "pow2"):
            raise ValueError(f"unknown router {self.router!r}; choose least_work or pow2")


def _work(seq: SimSeq) -> float:
    """Predicted remaining work of a held request, in ltr.routing's decode-token units."""
    expected = seq.req.expected_tokens
    remaining = None if expected is None else max(expected - seq.generated, 1.0)
    return request_work(remaining, seq.req.prompt_len if seq.generated == 0 else 0)


def simulate(requests: Sequence[SimRequest], profile: HardwareProfile, config: ClusterConfig,
             seed: int = 0, horizon: float = math.inf, record_shapes: bool = False) -> SimResult:
    """Run the trace to completion (or until `horizon` seconds); deterministic for a given seed."""
    if not requests:
        raise ValueError("empty trace")
    ids = [r.request_id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids must be unique")
    rng = random.Random(seed)
    replicas = [Replica(i, profile, config.policy, record_shapes) for i in range(config.num_replicas)]
    loads = [ReplicaLoad(replica_id=str(i)) for i in range(config.num_replicas)]
    routed = [0] * config.num_replicas
    arrivals = sorted(requests, key=lambda r: (r.arrival, r.request_id))
    records: list[RequestRecord] = []
    # Work each held request adds to its replica's load, refreshed when the request progresses.
    held_work: dict[str, float] = {}
    busy: list[tuple[float, int]] = []   # (time the replica's next step starts, replica index)
    is_busy = [False] * config.num_replicas
    next_arrival = 0
    now = 0.0

    while next_arrival < len(arrivals) or busy:
        t_arrival = arrivals[next_arrival].arrival if next_arrival < len(arrivals) else math.inf
        t_step = busy[0][0] if busy else math.inf
        now = min(t_arrival, t_step)
        if now > horizon:
            break
        if t_arrival <= t_step:
            req = arrivals[next_arrival]
            next_arrival += 1
            load = choose_replica(config.router, loads, rng)
            idx = int(load.replica_id)
            seq = new_seq(req, idx)
            replicas[idx].add(seq)
            routed[idx] += 1
            w = _work(seq)
            held_work[req.request_id] = w
            load.outstanding_work += w
            load.queue_len += 1
            if not is_busy[idx]:
                is_busy[idx] = True
                heapq.heappush(busy, (req.arrival, idx))
            continue
        _, idx = heapq.heappop(busy)
        replica = replicas[idx]
        t_end, finished = replica.step(now)
        load = loads[idx]
        for seq in finished:
            load.outstanding_work -= held_work.pop(seq.req.request_id)
            load.queue_len -= 1
            records.append(RequestRecord(
                request_id=seq.req.request_id, replica=idx, arrival=seq.req.arrival,
                first_token=seq.first_token, finish=seq.finish, prompt_len=seq.req.prompt_len,
                output_len=seq.req.output_len, generated=seq.generated, preemptions=seq.preemptions,
                max_idle_steps=seq.max_idle_steps))
        for seq in replica.running.values():
            w = _work(seq)
            load.outstanding_work += w - held_work[seq.req.request_id]
            held_work[seq.req.request_id] = w
        if replica.has_work:
            heapq.heappush(busy, (t_end, idx))
        else:
            is_busy[idx] = False
    for replica in replicas:
        replica.close_idle_runs()
    start = arrivals[0].arrival
    end = max((r.finish for r in records), default=start)
    return SimResult(
        records=records, makespan=end - start,
        steps=[r.stats.steps for r in replicas],
        kv_preemptions=sum(r.stats.kv_preemptions for r in replicas),
        rank_preemptions=sum(r.stats.rank_preemptions for r in replicas),
        promotions=sum(r.policy.stats.promotions for r in replicas),
        routed=routed, shapes=[shape for r in replicas for shape in r.stats.shapes])
