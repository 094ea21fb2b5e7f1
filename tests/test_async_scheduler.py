"""The rank scheduler under a GPU engine's async scheduling, replayed step by step without a model.

vLLM-CPU always runs synchronously, so an engine here never overlaps steps. ``sched_harness.Driver``
replays ``EngineCore.step_with_batch_queue``: step N+1 is scheduled on output placeholders before step N's
tokens come back, so rank and out-of-KV preemptions hit requests with output still in flight. The
workload is GPU-sized (256 seats, 1,500 requests in bursts, chunked prompts, scarce KV blocks).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import FinishReason

from ltr.scheduling.length_distribution import fit_length_distribution
from ltr.scheduling.policy import PolicyConfig, StarvationConfig
from ltr.scheduling.vllm_scheduler import AsyncRankScheduler, RankScheduler

from sched_harness import Driver, expected_tokens, make_request, make_scheduler, observe_upstream_schedule

POLICY = PolicyConfig(name="ltr", starvation=StarvationConfig(threshold=20, quantum=5, aged_share=0.25),
                      preemption_patience=0, max_preemptions_per_step=4)
# 3,200 blocks of 16 tokens: the batch fills all 256 seats at times, and decode growth runs out of KV.
GPU_LIKE = {"max_num_seqs": 256, "num_blocks": 3200, "block_size": 16, "max_num_batched_tokens": 2048,
            "max_model_len": 2048}
ENGINES = [
    pytest.param(AsyncRankScheduler, True, id="async-engine"),
    pytest.param(RankScheduler, False, id="sync-engine"),
    pytest.param(AsyncRankScheduler, False, id="async-class-on-sync-engine"),   # what vLLM-CPU runs
]


@dataclass(frozen=True)
class Spec:
    request_id: str
    prompt_len: int
    max_tokens: int
    score: float
    arrival_step: int


def bursty_workload(n: int = 1500, seed: int = 0) -> list[Spec]:
    """Bursts of ~100 requests every 8 steps; mostly short prompts, some long enough to be chunked, and
    noisy scores (a predictor, not an oracle) so the rank order is not the length order."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        kind = rng.random()
        prompt_len = (rng.randint(8, 96) if kind < 0.7 else rng.randint(96, 512) if kind < 0.95
                      else rng.randint(512, 1400))
        max_tokens = rng.randint(1, 160)
        specs.append(Spec(f"r{i}", prompt_len, max_tokens, max_tokens * rng.lognormvariate(0, 0.5),
                          1 + 8 * (i // 100) + rng.randint(0, 2)))
    return specs


def _arrivals(specs: list[Spec], block_size: int) -> dict[int, list]:
    arrivals: dict[int, list] = {}
    for s in specs:
        arrivals.setdefault(s.arrival_step, []).append(
            make_request(s.request_id, s.prompt_len, s.max_tokens, s.score, block_size=block_size))
    return arrivals


def _assert_complete_and_exact(driver: Driver, specs: list[Spec]) -> None:
    problems = []
    for s in specs:
        log = driver.logs.get(s.request_id)
        if log is None or log.finish_step is None:
            delivered = 0 if log is None else len(log.tokens)
            problems.append(f"{s.request_id}: never finished ({delivered} tokens)")
        elif log.tokens != (want := expected_tokens(s.request_id, s.max_tokens)):
            problems.append(f"{s.request_id}: {len(log.tokens)} tokens for max_tokens={s.max_tokens}, "
                            f"first wrong at {_first_difference(log.tokens, want)}")
        elif log.late_outputs or log.finish_reason != FinishReason.LENGTH:
            problems.append(f"{s.request_id}: {log.late_outputs} outputs after finishing, "
                            f"reason {log.finish_reason}")
    assert not problems, f"{len(problems)} of {len(specs)} requests wrong: {problems[:10]}"


def _first_difference(got: list[int], want: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


class OrderChecker:
    """At the start of vLLM's own schedule() (after the adapter's reordering and rank preemption), the
    waiting queues must be in ascending current sort key and the running batch in ascending running key
    (the sort key with seat-keeping aged requests first); out-of-KV victims chosen by upstream
    (``running.pop()``) must then be the worst of that batch; and no request may be preempted and
    scheduled in the same step."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.checks = 0
        #: Preemptions of requests with output still in flight (only an async engine has those).
        self.in_flight_preemptions = 0
        #: Requests the policy re-keyed because their output crossed a boundary.
        self.moved = 0
        self._entry_running: list[str] = []

    def at_upstream_entry(self, scheduler) -> None:
        self.checks += 1
        step = scheduler.rank_policy.stats.steps
        for name in ("waiting", "kv_holding_waiting"):
            queue = getattr(scheduler, name)
            keys = [scheduler._sort_key(r) for r in queue]
            if keys != sorted(keys) or keys != queue._keys:
                ids = [r.request_id for r in queue][:20]
                self.violations.append(f"step {step} {name} out of order: {ids}")
        keys = [scheduler._running_key(r) for r in scheduler.running]
        if keys != sorted(keys):
            bad = next(i for i in range(len(keys) - 1) if keys[i] > keys[i + 1])
            self.violations.append(f"step {step} running out of order at {bad}: "
                                   f"{[r.request_id for r in scheduler.running[bad:bad + 2]]}")
        self._entry_running = [r.request_id for r in scheduler.running]
        self.moved += len(scheduler.rank_policy.last_moved)

    def after_schedule(self, driver: Driver) -> None:
        output = driver.last_output
        preempted = set(output.preempted_req_ids or ())
        self.in_flight_preemptions += sum(
            1 for r in preempted if r in driver.scheduler.requests
            and driver.scheduler.requests[r].num_stale_output_tokens > 0)
        both = preempted & set(output.num_scheduled_tokens)
        if both:
            self.violations.append(f"step {driver.step_index}: preempted and scheduled: {sorted(both)}")
        entry = self._entry_running
        kv_victims = preempted & set(entry)
        worst = entry[len(entry) - len(kv_victims):]
        if kv_victims and kv_victims != set(worst):
            self.violations.append(f"step {driver.step_index}: out-of-KV victims {sorted(kv_victims)} "
                                   f"are not the worst-ranked {worst}")


def gittins_policy(tmp_path: Path) -> PolicyConfig:
    """The Gittins policy with POLICY's aging, over a length distribution fit on another draw of the
    bursty workload (scores and lengths as a validation split would give them): keys that move."""
    sample = bursty_workload(seed=7)
    path = tmp_path / "length_distribution.json"
    path.write_text(json.dumps(fit_length_distribution([s.score for s in sample],
                                                       [s.max_tokens for s in sample]).to_mapping()))
    return PolicyConfig(name="gittins", starvation=POLICY.starvation, preemption_patience=0,
                        max_preemptions_per_step=4, length_distribution=str(path))


@pytest.mark.parametrize("gittins", [pytest.param(False, id="ltr"), pytest.param(True, id="gittins")])
@pytest.mark.parametrize(("scheduler_cls", "async_scheduling"), ENGINES)
def test_bursty_overload_keeps_every_token_and_the_rank_order(
        tiny_model_path: Path, tmp_path: Path, scheduler_cls: type, async_scheduling: bool, gittins: bool) -> None:
    policy = gittins_policy(tmp_path) if gittins else POLICY
    scheduler = make_scheduler(tiny_model_path, scheduler_cls, policy=policy,
                               async_scheduling=async_scheduling, **GPU_LIKE)
    assert scheduler.vllm_config.max_concurrent_batches == (2 if async_scheduling else 1)
    specs = bursty_workload()
    checker = OrderChecker()
    driver = Driver(scheduler, arrivals=_arrivals(specs, GPU_LIKE["block_size"]),
                    after_schedule=checker.after_schedule)
    with observe_upstream_schedule(scheduler, checker.at_upstream_entry):
        driver.run_until_idle(max_steps=3000)

    _assert_complete_and_exact(driver, specs)
    assert checker.checks == driver.schedule_calls > 0
    assert checker.violations == [], checker.violations[:10]
    # The lag is real: under async scheduling victims are preempted with a step's output still in flight.
    assert (checker.in_flight_preemptions > 0) == async_scheduling, checker.in_flight_preemptions
    stats = scheduler.stats()
    # The run exercised what it is meant to: every preemption kind and aging, at full batch width.
    assert stats["rank_preemptions"] > 0 and stats["kv_preemptions"] > 0 and stats["promotions"] > 0, stats
    assert stats["max_running"] == GPU_LIKE["max_num_seqs"], stats
    assert not scheduler.requests and scheduler.get_kv_cache_usage() == 0.0
    # Keys moved with the output, so the order held under re-keying, not only under static keys.
    assert (checker.moved > 0) == gittins, checker.moved


@pytest.mark.parametrize(("scheduler_cls", "async_scheduling"),
                         [pytest.param(AsyncScheduler, True, id="async"),
                          pytest.param(Scheduler, False, id="sync")])
def test_harness_delivers_every_token_with_vllms_own_scheduler(
        tiny_model_path: Path, scheduler_cls: type, async_scheduling: bool) -> None:
    # A like workload through vLLM's own FCFS scheduler: a failure here is the harness's, not the adapter's.
    scheduler = make_scheduler(tiny_model_path, scheduler_cls, policy=POLICY,
                               async_scheduling=async_scheduling, **GPU_LIKE)
    specs = bursty_workload(600, seed=1)
    driver = Driver(scheduler, arrivals=_arrivals(specs, GPU_LIKE["block_size"]))
    driver.run_until_idle(max_steps=3000)
    _assert_complete_and_exact(driver, specs)
    assert not scheduler.requests and scheduler.get_kv_cache_usage() == 0.0


def test_async_finish_order_follows_the_score_without_preemption(tiny_model_path: Path) -> None:
    # All arrive at once, four seats, ample KV, score = true length (oracle SJF), no aging: nothing can
    # outrank a running request, so the lag must not change the order requests are admitted and finish in.
    policy = PolicyConfig(name="ltr", starvation=None, preemption_patience=0, max_preemptions_per_step=4)
    # Built as an engine plugs it in: RankScheduler turns into AsyncRankScheduler under async scheduling.
    scheduler = make_scheduler(tiny_model_path, RankScheduler, policy=policy, async_scheduling=True,
                               max_num_seqs=4, num_blocks=400, block_size=16, max_num_batched_tokens=256)
    assert type(scheduler) is AsyncRankScheduler
    lengths = list(range(2, 26))
    random.Random(2).shuffle(lengths)
    specs = [Spec(f"f{i}", 40, n, float(n), 1) for i, n in enumerate(lengths)]
    driver = Driver(scheduler, arrivals=_arrivals(specs, 16))
    driver.run_until_idle(max_steps=1000)

    _assert_complete_and_exact(driver, specs)
    stats = scheduler.stats()
    assert stats["rank_preemptions"] == stats["kv_preemptions"] == stats["promotions"] == 0, stats
    by_score = sorted(specs, key=lambda s: s.score)
    finish_steps = [driver.logs[s.request_id].finish_step for s in by_score]
    assert finish_steps == sorted(finish_steps), list(zip([s.score for s in by_score], finish_steps))
    assert driver.finish_order != [s.request_id for s in specs]   # arrival order differs from score order
