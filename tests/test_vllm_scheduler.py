"""The rank scheduler inside real vLLM V1 on CPU (tiny random Llama), against vLLM's own FCFS.

Two small in-process engines are shared by the module: vLLM's default scheduler and the adapter.
Both run float32, eager, with a small KV cache (so vLLM's own out-of-KV preemption happens) and a small
token budget (so prompts are chunked). Requests are driven step by step through `LLMEngine`, which
gives exact finish order and per-step observations without any timing.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltr.scheduling.engine import (
    SCORE_KEY,
    engine_kwargs,
    priority_for,
    scored_sampling_params,
)
from ltr.scheduling.policy import PolicyConfig, StarvationConfig

ENGINE_SETTINGS: dict[str, Any] = {
    "max_num_seqs": 4,
    "max_model_len": 128,
    "max_num_batched_tokens": 64,
    "enable_chunked_prefill": True,   # off in the CPU defaults (seeded requests); these requests are unseeded
    # 6 blocks of 32 tokens: a few 85-token requests overflow the KV cache.
    "block_size": 32,
    "num_gpu_blocks_override": 6,
    "dtype": "float32",
    "enforce_eager": True,  # no torch.compile warm-up for a 2-layer model
    "seed": 0,
}
# A fixed policy for most tests: no aging, so order is pure rank.
PLAIN_LTR = PolicyConfig(name="ltr", starvation=None, preemption_patience=0)


@dataclass(frozen=True)
class Spec:
    """One request of a test workload."""

    request_id: str
    prompt: str
    max_tokens: int
    score: float | None = None


@dataclass
class Run:
    """What a step-driven run observed."""

    finish_order: list[str]
    tokens: dict[str, list[int]]
    first_token_step: dict[str, int]
    finish_step: dict[str, int]
    cached_tokens: dict[str, int]
    steps: int


def _make_llm(model: Path, policy: PolicyConfig, **overrides: Any):
    from vllm import LLM

    return LLM(**engine_kwargs(str(model), policy, **{**ENGINE_SETTINGS, **overrides}))


@pytest.fixture(scope="module")
def engines(tiny_model_path: Path, in_process_vllm: None) -> dict[str, Any]:
    fcfs = _make_llm(tiny_model_path, PolicyConfig(name="fcfs"))
    ltr = _make_llm(tiny_model_path, PLAIN_LTR)
    # Engines live as long as the module: tearing one down in-process breaks the others' vLLM state.
    ltr_async = _make_llm(tiny_model_path, PLAIN_LTR, async_scheduling=True)
    return {"fcfs": fcfs, "ltr": ltr, "ltr_async": ltr_async}


def _scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


@pytest.fixture
def rank_scheduler(engines: dict[str, Any]) -> Iterator[Any]:
    """The adapter, reset to PLAIN_LTR before and after each test."""
    scheduler = _scheduler(engines["ltr"])
    scheduler.set_policy(PLAIN_LTR)
    yield scheduler
    assert not scheduler.requests, "test left requests in flight"
    scheduler.set_policy(PLAIN_LTR)


def _add(llm: Any, spec: Spec) -> None:
    params = scored_sampling_params(spec.score, max_tokens=spec.max_tokens, ignore_eos=True,
                                    temperature=0.0)
    llm.llm_engine.add_request(spec.request_id, spec.prompt, params)


def _drive(llm: Any, specs: Sequence[Spec], arrivals: dict[int, list[Spec]] | None = None,
           max_steps: int = 2000, stop_when: str | None = None) -> Run:
    """Submit `specs` now, `arrivals[step]` before that step; step until idle (or `stop_when` ends)."""
    engine = llm.llm_engine
    for spec in specs:
        _add(llm, spec)
    run = Run([], {}, {}, {}, {}, 0)
    arrivals = arrivals or {}
    for step in range(max_steps):
        for spec in arrivals.get(step, []):
            _add(llm, spec)
        if not engine.has_unfinished_requests() and step > max(arrivals, default=-1):
            break
        for out in engine.step():
            run.first_token_step.setdefault(out.request_id, step)
            if out.finished:
                run.finish_order.append(out.request_id)
                run.finish_step[out.request_id] = step
                run.tokens[out.request_id] = list(out.outputs[0].token_ids)
                run.cached_tokens[out.request_id] = out.num_cached_tokens or 0
        run.steps = step + 1
        if stop_when is not None and stop_when in run.tokens:
            break
    return run


def _abort_all(llm: Any) -> None:
    scheduler = _scheduler(llm)
    pending = list(scheduler.requests)
    if pending:
        llm.llm_engine.abort_request(pending, internal=True)
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()


LENGTHS = [30, 4, 26, 6, 22, 8, 18, 10, 14, 12]


def _mixed_workload(tag: str) -> list[Spec]:
    """Distinct lengths submitted long/short interleaved; the score is the true length (oracle)."""
    return [Spec(f"{tag}{i}", f"Request {i}: tell me about item number {i}.", n, float(n))
            for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def mixed_runs(engines: dict[str, Any]) -> dict[str, Run]:
    _scheduler(engines["ltr"]).set_policy(PLAIN_LTR)
    return {"fcfs": _drive(engines["fcfs"], _mixed_workload("m")),
            "ltr": _drive(engines["ltr"], _mixed_workload("m"))}


def test_short_predicted_requests_finish_first_under_ltr_but_not_fcfs(mixed_runs: dict[str, Run]) -> None:
    by_length = [f"m{i}" for i in sorted(range(len(LENGTHS)), key=LENGTHS.__getitem__)]
    assert mixed_runs["ltr"].finish_order == by_length
    assert mixed_runs["fcfs"].finish_order != by_length
    # FCFS lets the 30-token request (submitted first) finish before shorter ones submitted later.
    fcfs = mixed_runs["fcfs"].finish_order
    assert fcfs.index("m0") < fcfs.index("m9")


def test_greedy_outputs_identical_under_fcfs_and_ltr(mixed_runs: dict[str, Run]) -> None:
    fcfs, ltr = mixed_runs["fcfs"].tokens, mixed_runs["ltr"].tokens
    assert set(fcfs) == set(ltr) == {f"m{i}" for i in range(len(LENGTHS))}
    for request_id, tokens in fcfs.items():
        assert len(tokens) == LENGTHS[int(request_id[1:])]
        assert ltr[request_id] == tokens, request_id


class _VictimSpy:
    """Records every preemption and checks the victim is the worst-ranked of the running batch."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.original = scheduler._preempt_request
        self.victims: list[str] = []
        self.not_worst: list[str] = []

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> None:
        key = self.scheduler._sort_key(request)
        if any(self.scheduler._sort_key(r) > key for r in self.scheduler.running):
            self.not_worst.append(request.request_id)
        self.victims.append(request.request_id.rsplit("-", 1)[0])  # internal id = external-<uuid8>
        self.original(request, *args, **kwargs)

    def __enter__(self) -> _VictimSpy:
        self.scheduler._preempt_request = self
        return self

    def __exit__(self, *exc: object) -> None:
        del self.scheduler._preempt_request


def test_preemption_and_readmission_keep_every_output_complete(
        engines: dict[str, Any], rank_scheduler: Any, queue_order_violations: list[str]) -> None:
    # Four 85-token requests fill every seat and outgrow the 6-block KV cache (vLLM's own
    # preemption); better-ranked short ones arriving later evict them by rank.
    longs = [Spec(f"p-long{i}", f"Long story {i} " * 6, 60, 100.0 + i) for i in range(4)]
    shorts = [Spec(f"p-short{i}", f"Quick question {i}?", 6, float(i)) for i in range(4)]
    arrivals = {3: shorts[:2], 5: shorts[2:]}
    with _VictimSpy(rank_scheduler) as spy:
        run = _drive(engines["ltr"], longs, arrivals)
    stats = rank_scheduler.stats()
    assert stats["rank_preemptions"] > 0
    assert stats["kv_preemptions"] > 0
    assert spy.victims and not spy.not_worst
    reference = _drive(engines["fcfs"], [Spec("ref-" + s.request_id, s.prompt, s.max_tokens)
                                         for s in longs + shorts])
    for spec in longs + shorts:
        assert len(run.tokens[spec.request_id]) == spec.max_tokens, spec.request_id
        assert run.tokens[spec.request_id] == reference.tokens["ref-" + spec.request_id], spec.request_id
    # Shorts arrived while longs ran, yet all finish before any long one.
    assert set(run.finish_order[:4]) == {s.request_id for s in shorts}
    assert queue_order_violations == []


def test_out_of_kv_preemption_evicts_the_worst_ranked(engines: dict[str, Any], rank_scheduler: Any) -> None:
    # Better scores arrive later: vLLM's own victim (the last admitted) would be the best-ranked
    # request; the adapter's best-first running order makes it evict the worst-ranked instead.
    specs = [Spec(f"k{i}", f"Memory hog {i} " * 6, 60, float(10 - i)) for i in range(4)]
    with _VictimSpy(rank_scheduler) as spy:
        run = _drive(engines["ltr"], specs[:1], {1: specs[1:2], 2: specs[2:3], 3: specs[3:]})
    assert rank_scheduler.stats()["kv_preemptions"] > 0
    assert spy.victims[0] == "k0" and not spy.not_worst
    assert all(len(run.tokens[s.request_id]) == s.max_tokens for s in specs)
    # Best-ranked first: finish steps never decrease with the score.
    steps = [run.finish_step[s.request_id] for s in sorted(specs, key=lambda s: s.score or 0.0)]
    assert steps == sorted(steps) and steps[0] < steps[-1]


def _check_order(scheduler: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Checks, each time vLLM's own schedule() reads them, that `scheduler`'s waiting queue (sort key) and
    running batch (running key) are in current key order; returns the list the violations are appended to.

    The adapter moves only what admissions and promotions changed, so this is where a stale order would show.
    """
    from vllm.v1.core.sched.scheduler import Scheduler

    violations: list[str] = []
    upstream = Scheduler.schedule

    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self is scheduler:
            keys = [self._sort_key(r) for r in self.waiting]
            if keys != sorted(keys) or keys != self.waiting._keys:
                violations.append(f"step {self.rank_policy.stats.steps}: {[r.request_id for r in self.waiting]}")
            running = [self._running_key(r) for r in self.running]
            if running != sorted(running):
                violations.append(f"step {self.rank_policy.stats.steps} running: "
                                  f"{[r.request_id for r in self.running]}")
        return upstream(self, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "schedule", checked)
    return violations


@pytest.fixture
def queue_order_violations(rank_scheduler: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return _check_order(rank_scheduler, monkeypatch)


def test_starvation_prevention_bounds_the_wait_of_a_long_request(
        engines: dict[str, Any], rank_scheduler: Any, queue_order_violations: list[str]) -> None:
    llm = engines["ltr"]
    long = Spec("s-long", "A long request that everybody outranks.", 6, 1e6)
    # An endless stream: every step four better-ranked one-token requests fill all four seats.
    stream = {step: [Spec(f"s-{step}-{j}", f"ping {step} {j}", 1, float(step)) for j in range(4)]
              for step in range(400)}
    starvation = StarvationConfig(threshold=5, quantum=2)
    rank_scheduler.set_policy(PolicyConfig(name="ltr", starvation=starvation))
    aged = _drive(llm, [long], stream, max_steps=200, stop_when=long.request_id)
    promotions = rank_scheduler.stats()["promotions"]
    _abort_all(llm)
    assert long.request_id in aged.tokens and len(aged.tokens[long.request_id]) == long.max_tokens
    assert promotions >= 1
    # Each cycle of `threshold` waiting steps buys `quantum` served steps; one extra cycle of slack
    # for the re-prefill after a rank preemption and promoted stream requests ahead of it.
    bound = (long.max_tokens // starvation.quantum + 2) * (starvation.threshold + starvation.quantum + 2)
    assert aged.steps <= bound
    assert queue_order_violations == []

    rank_scheduler.set_policy(PolicyConfig(name="ltr", starvation=None))
    unaged = _drive(llm, [long], stream, max_steps=bound, stop_when=long.request_id)
    _abort_all(llm)
    assert long.request_id not in unaged.tokens


def test_mlfq_waiting_queue_stays_in_key_order(
        engines: dict[str, Any], rank_scheduler: Any, queue_order_violations: list[str]) -> None:
    # MLFQ keys move with served tokens and promotions move keys too: the queue must follow both.
    rank_scheduler.set_policy(PolicyConfig(name="mlfq", mlfq_base_quantum=2,
                                           starvation=StarvationConfig(threshold=5, quantum=2)))
    specs = [Spec(f"q-{i}", f"Queue order {i}", 3 + 5 * (i % 3), None) for i in range(12)]
    stream = {step: [Spec(f"q-{step}-s", f"short {step}", 1, None)] for step in range(0, 60, 3)}
    run = _drive(engines["ltr"], specs, stream, max_steps=400)
    _abort_all(engines["ltr"])
    assert all(len(run.tokens[s.request_id]) == s.max_tokens for s in specs)
    assert rank_scheduler.stats()["promotions"] >= 1
    assert queue_order_violations == []


def test_running_batch_follows_a_promotion_that_runs_out(
        engines: dict[str, Any], rank_scheduler: Any, queue_order_violations: list[str]) -> None:
    # The long request waits behind four better-ranked ones, is promoted (evicting the worst of them),
    # keeps its seat once its quantum runs out, and must then fall back behind the others in the batch.
    rank_scheduler.set_policy(PolicyConfig(name="ltr", starvation=StarvationConfig(threshold=3, quantum=2)))
    mediums = [Spec(f"e-m{i}", f"Medium {i}", 20, float(i + 1)) for i in range(4)]
    long = Spec("e-long", "Long one", 8, 1e6)
    run = _drive(engines["ltr"], mediums, {1: [long]})
    stats = rank_scheduler.stats()
    assert stats["promotions"] >= 1 and stats["rank_preemptions"] >= 1
    assert all(len(run.tokens[s.request_id]) == s.max_tokens for s in [*mediums, long])
    assert queue_order_violations == []


def test_gittins_keys_move_with_the_output_and_evict_an_outlived_prediction(
        engines: dict[str, Any], rank_scheduler: Any, queue_order_violations: list[str], tmp_path: Path) -> None:
    # Four requests predicted 1-4 tokens (bin 0) really generate 18 and fill the four seats; two fresh ones,
    # predicted alike and really 3 tokens, arrive at step 8. Past 4 tokens the veterans' keys move to the
    # pooled tail (4-200 tokens), so under Gittins the fresh ones evict two of them and finish first; under
    # static LTR (same score, later arrival) they wait for a seat. Greedy outputs match vLLM's own FCFS.
    path = tmp_path / "dist.json"
    path.write_text(json.dumps({"edges": [0.0], "bins": [[1, 2, 3, 4], [100, 200]], "pooled": [1, 4, 200]}))
    veterans = [Spec(f"g-v{i}", f"Veteran {i}", 18, -1.0) for i in range(4)]
    fresh = {8: [Spec(f"g-f{i}", f"Fresh {i}", 3, -1.0) for i in range(2)]}
    fcfs = _drive(engines["fcfs"], veterans, fresh)
    orders = {}
    for name in ("gittins", "ltr"):
        rank_scheduler.set_policy(PolicyConfig(name=name, starvation=None, preemption_patience=0,
                                               length_distribution=str(path)))
        run = _drive(engines["ltr"], veterans, fresh)
        assert run.tokens == fcfs.tokens
        orders[name] = (run.finish_order, rank_scheduler.stats())
    gittins_order, gittins_stats = orders["gittins"]
    ltr_order, ltr_stats = orders["ltr"]
    assert set(gittins_order[:2]) == {"g-f0", "g-f1"} and gittins_stats["rank_preemptions"] >= 2, gittins_stats
    assert set(ltr_order[-2:]) == {"g-f0", "g-f1"} and ltr_stats["rank_preemptions"] == 0, ltr_stats
    assert queue_order_violations == []


def test_running_batch_follows_keys_that_move_past_each_other(
        engines: dict[str, Any], rank_scheduler: Any, queue_order_violations: list[str], tmp_path: Path) -> None:
    # Two requests predicted 1-4 tokens run ahead of two predicted 5-6; all four really generate 12. Past
    # 4 tokens the first two move to the pooled tail (4-1000), behind the other two, which follow them
    # past 6: the batch's order must flip twice while no request enters or leaves it.
    path = tmp_path / "dist.json"
    path.write_text(json.dumps({"edges": [0.0], "bins": [[1, 2, 3, 4], [5, 6]], "pooled": [1, 4, 1000]}))
    specs = [Spec(f"m-a{i}", f"Short guess {i}", 12, -1.0) for i in range(2)] + \
            [Spec(f"m-b{i}", f"Longer guess {i}", 12, 1.0) for i in range(2)]
    rank_scheduler.set_policy(PolicyConfig(name="gittins", starvation=None, length_distribution=str(path)))
    firsts = []
    policy = rank_scheduler.rank_policy
    observe = policy.observe_step

    def record(*args: Any, **kwargs: Any) -> None:
        observe(*args, **kwargs)
        firsts.append(rank_scheduler.running[0].request_id if rank_scheduler.running else None)

    policy.observe_step = record
    run = _drive(engines["ltr"], specs)
    assert all(len(run.tokens[s.request_id]) == s.max_tokens for s in specs)
    # The batch's head after each step, by group: a-guesses, then b-guesses once a's moved, then a's again.
    assert [group for group, _ in itertools.groupby(f[:3] for f in firsts if f)] == ["m-a", "m-b", "m-a"], firsts
    assert queue_order_violations == []


def test_scheduler_class_follows_vllms_resolved_async_setting_and_keeps_outputs(
        engines: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Asked for async scheduling, vLLM-CPU resolves it off, so the engine runs the synchronous class (the
    # async class under real async semantics is driven by hand in test_async_scheduler.py), and
    # `resolved_async_scheduling`, which `ltr resolve-config` reports, agrees with vLLM. The preemption
    # workload: rank and out-of-KV preemption and a promotion that runs out; outputs vs vLLM's own FCFS.
    from ltr.scheduling.engine import resolved_async_scheduling
    from ltr.scheduling.vllm_scheduler import RankScheduler

    llm = engines["ltr_async"]
    scheduler = _scheduler(llm)
    assert type(scheduler) is RankScheduler
    assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling is False
    assert resolved_async_scheduling({**ENGINE_SETTINGS, "async_scheduling": True}, "cpu") is False
    scheduler.set_policy(PolicyConfig(name="ltr", starvation=StarvationConfig(threshold=3, quantum=2),
                                      preemption_patience=0))
    violations = _check_order(scheduler, monkeypatch)
    longs = [Spec(f"a-long{i}", f"Long story {i} " * 6, 60, 100.0 + i) for i in range(4)]
    shorts = [Spec(f"a-short{i}", f"Quick question {i}?", 6, float(i)) for i in range(4)]
    run = _drive(llm, longs, {3: shorts[:2], 5: shorts[2:]})
    stats = scheduler.stats()
    assert stats["rank_preemptions"] > 0 and stats["kv_preemptions"] > 0 and stats["promotions"] > 0
    assert violations == []
    reference = _drive(engines["fcfs"], [Spec("ref-" + s.request_id, s.prompt, s.max_tokens)
                                         for s in longs + shorts])
    for spec in longs + shorts:
        assert run.tokens[spec.request_id] == reference.tokens["ref-" + spec.request_id], spec.request_id
        assert len(run.tokens[spec.request_id]) == spec.max_tokens


def test_missing_nan_inf_scores_fall_back_to_fcfs_logged_once(
        engines: dict[str, Any], rank_scheduler: Any, caplog: pytest.LogCaptureFixture) -> None:
    scored = [Spec(f"u-scored{i}", f"Scored {i}", 8, s) for i, s in enumerate([5.0, 0.5, 3.0, 9.0, 1.0])]
    unscored = [Spec("u-none", "No score", 8, None), Spec("u-nan", "NaN score", 8, float("nan")),
                Spec("u-inf", "Inf score", 8, float("inf"))]
    with caplog.at_level(logging.WARNING, logger="ltr.scheduling.vllm_scheduler"):
        run = _drive(engines["ltr"], scored[:2] + unscored + scored[2:])
    warnings = [r for r in caplog.records if SCORE_KEY in r.getMessage()]
    assert len(warnings) == 1
    assert rank_scheduler.stats()["unscored_requests"] == 3
    assert all(len(run.tokens[s.request_id]) == 8 for s in scored + unscored)
    # Unscored requests go first in arrival order, then scored ones by ascending score.
    expected = ["u-none", "u-nan", "u-inf", "u-scored1", "u-scored4", "u-scored2", "u-scored0", "u-scored3"]
    steps = [run.first_token_step[r] for r in expected]
    assert steps == sorted(steps) and steps[0] < steps[-1]


def test_chunked_prefill_and_prefix_caching_still_work(engines: dict[str, Any], rank_scheduler: Any) -> None:
    prompt = "Shared system prompt that is long enough to fill whole KV blocks. " * 6
    first = _drive(engines["ltr"], [Spec("c1", prompt, 4, 1.0)])
    second = _drive(engines["ltr"], [Spec("c2", prompt, 4, 1.0)])
    # The prompt is longer than the 64-token step budget, so it was chunked across steps.
    assert first.first_token_step["c1"] >= 1
    assert second.cached_tokens["c2"] > 0
    assert second.tokens["c2"] == first.tokens["c1"]


class _Queued:
    """A stand-in request: the queue reads only identity and, in errors, the id."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "pop", "remove", "rekey"]), st.integers(0, 7),
                          st.integers(0, 3)), max_size=60))
def test_ranked_queue_matches_a_sorted_list(ops: list[tuple[str, int, int]]) -> None:
    # Few distinct keys, so requests share keys and the binary search must step past equal ones.
    from ltr.scheduling.vllm_scheduler import RankedRequestQueue

    requests = [_Queued(f"q{i}") for i in range(8)]
    keys = {r: (0.0,) for r in requests}
    queue = RankedRequestQueue(keys.__getitem__)
    reference: list[_Queued] = []   # in insertion order; stable sort by key = the queue's order
    for op, i, k in ops:
        request = requests[i]
        if op == "add" and request not in reference:
            queue.add_request(request)
            reference.append(request)
        elif op == "pop" and reference:
            expected = min(reference, key=keys.__getitem__)
            assert queue.pop_request() is expected
            reference.remove(expected)
        elif op == "remove":
            if request in reference:
                queue.remove_request(request)
                reference.remove(request)
            else:
                with pytest.raises(ValueError):
                    queue.remove_request(request)
        elif op == "rekey":
            keys[request] = (float(k),)
            queue.reposition(request)
            if request in reference:   # moves behind requests already queued under an equal key
                reference.remove(request)
                reference.append(request)
        assert list(queue) == sorted(reference, key=keys.__getitem__)
    queue.remove_requests(requests)
    assert not queue and len(queue) == 0


def test_engine_kwargs_select_scheduler_per_policy() -> None:
    ltr = engine_kwargs("m", PolicyConfig(name="mlfq"), platform="cpu")
    assert ltr["scheduler_cls"].endswith("vllm_scheduler.RankScheduler")
    assert ltr["additional_config"]["ltr"]["policy"]["name"] == "mlfq"
    # One class is plugged in whatever is asked; it picks the async variant from vLLM's resolved config.
    assert engine_kwargs("m", PolicyConfig(), platform="gpu", async_scheduling=True)["scheduler_cls"] == \
        ltr["scheduler_cls"]
    priority = engine_kwargs("m", PolicyConfig(name="priority"), platform="cpu")
    assert priority["scheduling_policy"] == "priority" and "scheduler_cls" not in priority
    assert "scheduler_cls" not in engine_kwargs("m", PolicyConfig(name="fcfs"), platform="cpu")
    assert priority_for(PolicyConfig(name="priority"), 7.9) == 7
    assert priority_for(PolicyConfig(name="priority"), None) < priority_for(PolicyConfig(name="priority"), -1e9)
    assert priority_for(PolicyConfig(name="ltr"), 7.9) == 0
    assert scored_sampling_params(None, max_tokens=3).extra_args is None
    assert scored_sampling_params(2, max_tokens=3).extra_args == {SCORE_KEY: 2.0}


def test_adapter_config_validation_errors_are_clear() -> None:
    from ltr.scheduling.vllm_scheduler import AdapterConfig

    assert AdapterConfig.from_additional_config(None).policy == PolicyConfig()
    parsed = AdapterConfig.from_additional_config({"ltr": {"policy": {"name": "mlfq"}, "stats_every": 5}})
    assert parsed.policy.name == "mlfq" and parsed.stats_every == 5
    with pytest.raises(ValueError, match=r"additional_config\['ltr'\]: unknown key"):
        AdapterConfig.from_additional_config({"ltr": {"polcy": {}}})
    with pytest.raises(ValueError, match=r"\['policy'\]: unknown scheduling policy"):
        AdapterConfig.from_additional_config({"ltr": {"policy": {"name": "lifo"}}})
    with pytest.raises(ValueError, match="stats_every"):
        AdapterConfig.from_additional_config({"ltr": {"stats_every": 0}})
    with pytest.raises(ValueError, match="must be a mapping"):
        AdapterConfig.from_additional_config({"ltr": "ltr"})
