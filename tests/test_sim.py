"""Simulator tests: hand-computed schedules, determinism, conservation, starvation bound, routing spread."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import kendalltau

from ltr.scheduling.policy import PolicyConfig, StarvationConfig
from ltr.sim import (
    ClusterConfig,
    EngineLimits,
    HardwareProfile,
    SimRequest,
    SimResult,
    StepTimeModel,
    a100_llama3_8b,
    build_requests,
    noisy_scores,
    poisson_arrivals,
    simulate,
)

# 1 s per sampled token, prefill and context free: a request of n output tokens needs n steps.
ONE_SEC_PER_TOKEN = StepTimeModel(a=0.0, b=0.0, c=1.0, d=0.0)


def unit_profile(max_num_seqs: int = 1, num_kv_blocks: int = 10_000, budget: int = 10_000) -> HardwareProfile:
    return HardwareProfile("unit", ONE_SEC_PER_TOKEN,
                           EngineLimits(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                        num_kv_blocks=num_kv_blocks, block_size=16))


def run(requests: list[SimRequest], name: str, profile: HardwareProfile | None = None,
        starvation: StarvationConfig | None = None, preemption_patience: int = 0,
        **cluster) -> SimResult:
    policy = PolicyConfig(name=name, starvation=starvation, preemption_patience=preemption_patience)
    config = ClusterConfig(policy=policy, **cluster)
    return simulate(requests, profile or unit_profile(), config, seed=0)


def test_fcfs_vs_shortest_first_hand_computed() -> None:
    # A (10 tokens), then B (2), then C (1), all at t=0, batch size 1.
    # FCFS: A ends 10, B 12, C 13 -> per-token 10/10, 12/2, 13/1 -> mean 20/3 = 6.667 s/token.
    # SJF:  C ends 1, B 3, A 13   -> per-token 1/1, 3/2, 13/10    -> mean 3.8/3 = 1.2667 s/token.
    reqs = build_requests([1, 1, 1], [10, 2, 1], [0.0, 0.0, 0.0], scores=[10.0, 2.0, 1.0])
    fcfs = run(reqs, "fcfs")
    sjf = run(reqs, "ltr")
    assert {r.request_id: r.finish for r in fcfs.records} == {"r0": 10.0, "r1": 12.0, "r2": 13.0}
    assert {r.request_id: r.finish for r in sjf.records} == {"r2": 1.0, "r1": 3.0, "r0": 13.0}
    assert fcfs.summary()["mean_per_token_latency"] == pytest.approx(20 / 3)
    assert sjf.summary()["mean_per_token_latency"] == pytest.approx(3.8 / 3)


def test_rank_preemption_hand_computed() -> None:
    # A (10 tokens) starts alone at t=0; B (2) and C (1) arrive at t=0.5 while A's first step runs.
    # At t=1 LTR evicts A (recompute is free here) for C: C ends 2, B ends 4, A resumes and ends 13.
    # Per-token: C 1.5/1, B 3.5/2, A 13/10 -> mean 4.55/3. FCFS never preempts: A 10, B 12, C 13.
    reqs = build_requests([1, 1, 1], [10, 2, 1], [0.0, 0.5, 0.5], scores=[10.0, 2.0, 1.0])
    ltr = run(reqs, "ltr")
    fcfs = run(reqs, "fcfs")
    assert {r.request_id: r.finish for r in ltr.records} == {"r2": 2.0, "r1": 4.0, "r0": 13.0}
    assert {r.request_id: r.preemptions for r in ltr.records} == {"r0": 1, "r1": 0, "r2": 0}
    assert ltr.summary()["mean_per_token_latency"] == pytest.approx(4.55 / 3)
    assert {r.request_id: r.finish for r in fcfs.records} == {"r0": 10.0, "r1": 12.0, "r2": 13.0}
    assert fcfs.summary()["mean_per_token_latency"] == pytest.approx((10 / 10 + 11.5 / 2 + 12.5 / 1) / 3)


def test_preemption_patience_delays_the_eviction() -> None:
    # As above, but C may only evict A after waiting 2 whole iterations (steps 1-2 and 2-3 end with
    # C unscheduled): A is evicted at t=3, C ends 4, B runs next and ends 6, A re-prefills and ends 13.
    reqs = build_requests([1, 1, 1], [10, 2, 1], [0.0, 0.5, 0.5], scores=[10.0, 2.0, 1.0])
    patient = run(reqs, "ltr", preemption_patience=2)
    assert {r.request_id: r.finish for r in patient.records} == {"r2": 4.0, "r1": 6.0, "r0": 13.0}
    assert patient.rank_preemptions == 1


def test_gittins_evicts_a_request_that_outlives_its_prediction(tmp_path) -> None:
    # A and B are both predicted 1-4 tokens (bin 0). A (really 10) starts at t=0, B (really 2) arrives at
    # t=0.5. Static LTR keeps A ahead (same score, earlier): A ends 10, B 12. Under Gittins, A's 4th token
    # (t=4) takes it past its bin: its key follows the pooled tail (4-50 tokens), fresh B outranks it and
    # evicts it at t=4; B ends 6, A recomputes (free here) and ends 12.
    table = {"edges": [0.0], "bins": [[1, 2, 3, 4], [40, 50]], "pooled": [1, 4, 50]}
    path = tmp_path / "dist.json"
    path.write_text(json.dumps(table))
    reqs = build_requests([1, 1], [10, 2], [0.0, 0.5], scores=[-1.0, -1.0])
    gittins = PolicyConfig(name="gittins", starvation=None, preemption_patience=0, gittins_per_token=False,
                           gittins_prefill_weight=0.0, length_distribution=str(path))
    moving = simulate(reqs, unit_profile(), ClusterConfig(policy=gittins), seed=0)
    static = run(reqs, "ltr")
    assert {r.request_id: r.finish for r in moving.records} == {"r1": 6.0, "r0": 12.0}
    assert {r.request_id: r.preemptions for r in moving.records} == {"r0": 1, "r1": 0}
    assert {r.request_id: r.finish for r in static.records} == {"r0": 10.0, "r1": 12.0}
    assert moving.summary()["mean_per_token_latency"] == pytest.approx((12 / 10 + 5.5 / 2) / 2)


def test_priority_orders_waiting_but_never_preempts() -> None:
    reqs = build_requests([1, 1, 1], [10, 2, 1], [0.0, 0.5, 0.5], scores=[10.0, 2.0, 1.0])
    prio = run(reqs, "priority")
    assert {r.request_id: r.finish for r in prio.records} == {"r0": 10.0, "r2": 11.0, "r1": 13.0}
    assert all(r.preemptions == 0 for r in prio.records)


def test_step_time_model_prefill_and_batching() -> None:
    # Two requests batched together: step cost a + b*prefill + c*sampled + d*kv, hand-computed.
    profile = HardwareProfile("unit", StepTimeModel(a=1.0, b=0.1, c=0.5, d=0.01),
                              EngineLimits(max_num_seqs=4, max_num_batched_tokens=100, num_kv_blocks=100))
    reqs = build_requests([10, 20], [2, 1], [0.0, 0.0])
    res = simulate(reqs, profile, ClusterConfig(policy=PolicyConfig(name="fcfs")))
    # step 1: prefill 30 tokens, 2 sample, kv 30 -> 1 + 3 + 1 + 0.3 = 5.3 (r1 done: 1 token)
    # step 2: r0 decodes 1 token, kv 11 -> 1 + 0 + 0.5 + 0.11 = 1.61 -> r0 ends at 6.91
    finish = {r.request_id: r.finish for r in res.records}
    assert finish["r1"] == pytest.approx(5.3)
    assert finish["r0"] == pytest.approx(6.91)


def test_chunked_prefill_respects_token_budget() -> None:
    # A 25-token prompt under an 8-token budget needs ceil(25/8) = 4 steps before its first token.
    profile = HardwareProfile("unit", StepTimeModel(a=1.0, b=0.0, c=0.0, d=0.0),
                              EngineLimits(max_num_seqs=4, max_num_batched_tokens=8, num_kv_blocks=100))
    res = simulate(build_requests([25], [3], [0.0]), profile, ClusterConfig(policy=PolicyConfig(name="fcfs")))
    (rec,) = res.records
    assert rec.first_token == pytest.approx(4.0)
    assert rec.finish == pytest.approx(6.0)


def test_without_chunked_prefill_a_prompt_that_does_not_fit_waits_whole() -> None:
    # Budget 30, 1 s per step, prompts of 20, 20 and 10 tokens. Chunked: step 1 prefills r0 and 10 tokens of
    # r1; step 2 r0's decode, r1's last 10 and r2. Whole prefills: r1 does not fit beside r0 in step 1, and
    # r2, which would, waits behind it; step 2 takes r0's decode and r1 (21), and r2 (10) no longer fits.
    def first_tokens(chunked: bool) -> dict[str, float]:
        limits = EngineLimits(max_num_seqs=4, max_num_batched_tokens=30, num_kv_blocks=100, chunked_prefill=chunked)
        profile = HardwareProfile("unit", StepTimeModel(a=1.0, b=0.0, c=0.0, d=0.0), limits)
        res = simulate(build_requests([20, 20, 10], [3, 3, 3], [0.0, 0.0, 0.0]), profile,
                       ClusterConfig(policy=PolicyConfig(name="fcfs")))
        return {r.request_id: r.first_token for r in res.records}

    assert first_tokens(chunked=True) == {"r0": 1.0, "r1": 2.0, "r2": 2.0}
    assert first_tokens(chunked=False) == {"r0": 1.0, "r1": 2.0, "r2": 3.0}


def test_out_of_kv_preempts_worst_ranked_and_completes() -> None:
    # 3 blocks of 16 tokens: both 16-token prompts fit (1 block each), but their first decodes need a
    # second block each -> 4 > 3, so the worse-ranked (longer-predicted) one is evicted.
    profile = HardwareProfile("unit", ONE_SEC_PER_TOKEN,
                              EngineLimits(max_num_seqs=4, max_num_batched_tokens=1000, num_kv_blocks=3,
                                           block_size=16))
    reqs = build_requests([16, 16], [24, 8], [0.0, 0.0], scores=[24.0, 8.0])
    res = run(reqs, "ltr", profile)
    by_id = {r.request_id: r for r in res.records}
    assert res.kv_preemptions >= 1
    assert by_id["r0"].preemptions >= 1 and by_id["r1"].preemptions == 0   # the worse-ranked one is evicted
    assert all(r.generated == r.output_len for r in res.records)


@pytest.mark.parametrize(("c_prompt", "num_kv_blocks", "prefix_caching", "a_finish"), [
    (1, 100, True, 13.0),    # both of A's full blocks survive: only its 9th token is recomputed
    (1, 100, False, 22.0),   # no prefix caching: A re-prefills all 9 tokens
    (12, 4, True, 29.0),     # C's 3-block prompt pops A's last block off the free queue: 5 recomputed
])
def test_recompute_reuses_the_evicted_prefix_left_in_the_free_queue(
        c_prompt: int, num_kv_blocks: int, prefix_caching: bool, a_finish: float) -> None:
    # 1 s per step + 1 s per prefill token; one seat; 4-token blocks. A (8-token prompt) runs its prefill
    # t=0-9; C (better-ranked) arrives at 0.5 and evicts A at t=9 (A has 8 computed tokens = 2 full
    # blocks and 1 generated); C's prefill + token take 1 + c_prompt s; then A resumes and decodes.
    profile = HardwareProfile("unit", StepTimeModel(a=1.0, b=1.0, c=0.0, d=0.0),
                              EngineLimits(max_num_seqs=1, max_num_batched_tokens=1000,
                                           num_kv_blocks=num_kv_blocks, block_size=4,
                                           prefix_caching=prefix_caching))
    reqs = build_requests([8, c_prompt], [3, 1], [0.0, 0.5], scores=[10.0, 1.0])
    finish = {r.request_id: r.finish for r in run(reqs, "ltr", profile).records}
    assert finish == {"r1": 9.0 + 1 + c_prompt, "r0": a_finish}


def _random_trace(n: int, seed: int, rate: float = 40.0) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, 400, size=n)
    output = rng.integers(1, 600, size=n)
    scores, _ = noisy_scores(output, 0.5, rng)
    return build_requests(prompt, output, poisson_arrivals(n, rate, rng), scores=scores)


SMALL = HardwareProfile("small", StepTimeModel(a=0.01, b=1e-4, c=5e-4, d=1e-6),
                        EngineLimits(max_num_seqs=16, max_num_batched_tokens=512, num_kv_blocks=300))


@pytest.mark.parametrize("name", ["fcfs", "priority", "mlfq", "ltr", "gittins"])
def test_conservation(name: str) -> None:
    reqs = _random_trace(300, seed=3)
    res = simulate(reqs, SMALL, ClusterConfig(num_replicas=3, router="least_work",
                                              policy=PolicyConfig(name=name)), seed=1)
    assert sorted(r.request_id for r in res.records) == sorted(r.request_id for r in reqs)
    by_id = {r.request_id: r for r in reqs}
    for rec in res.records:
        assert rec.generated == by_id[rec.request_id].output_len
        assert rec.arrival <= rec.first_token <= rec.finish
    assert sum(res.routed) == len(reqs)
    if name in ("fcfs", "priority"):
        assert res.rank_preemptions == 0


def test_deterministic_with_seed() -> None:
    reqs = _random_trace(200, seed=5)
    config = ClusterConfig(num_replicas=4, router="pow2", policy=PolicyConfig(name="ltr"))
    a = simulate(reqs, SMALL, config, seed=7)
    b = simulate(reqs, SMALL, config, seed=7)
    c = simulate(reqs, SMALL, config, seed=8)
    assert a.records == b.records
    assert [r.replica for r in a.records] != [r.replica for r in c.records]


def test_starvation_bound() -> None:
    # One long request, then an endless-looking stream of better-ranked short ones, batch size 1.
    # Each promotion buys the long request 5 steps; it needs 15 tokens, so three promotions finish it
    # while the shorts' backlog (5 per cycle) stays below the threshold (were the shorts starving too,
    # promoted shorts would outrank the promoted long request and the bound would not hold).
    long_req = SimRequest("long", 0.0, 1, 15, score=1000.0)
    shorts = [SimRequest(f"s{i}", 0.5 + i, 1, 1, score=1.0) for i in range(400)]
    profile = unit_profile(max_num_seqs=1)
    starving = run([long_req, *shorts], "ltr", profile, starvation=None)
    guarded = run([long_req, *shorts], "ltr", profile, starvation=StarvationConfig(threshold=20, quantum=5))
    long_starving = next(r for r in starving.records if r.request_id == "long")
    long_guarded = next(r for r in guarded.records if r.request_id == "long")
    assert long_starving.max_idle_steps > 300          # waits out the whole stream
    assert long_guarded.max_idle_steps <= 20           # the configured threshold
    assert long_guarded.finish < long_starving.finish
    assert guarded.promotions >= 1


@pytest.mark.parametrize("router", ["least_work", "pow2"])
def test_routers_spread_load(router: str) -> None:
    reqs = _random_trace(800, seed=11, rate=200.0)
    res = simulate(reqs, SMALL, ClusterConfig(num_replicas=8, router=router, policy=PolicyConfig(name="fcfs")))
    assert min(res.routed) >= 0.5 * len(reqs) / 8
    assert max(res.routed) <= 1.5 * len(reqs) / 8


def test_noise_model_hits_target_tau() -> None:
    lens = np.random.default_rng(0).integers(1, 800, size=600)
    for target in (0.3, 0.55, 0.9):
        scores, realized = noisy_scores(lens, target, np.random.default_rng(1))
        assert realized == pytest.approx(target, abs=0.01)
        assert kendalltau(scores, lens).statistic == pytest.approx(realized)


def test_a100_profile_is_derived_and_sane() -> None:
    profile = a100_llama3_8b()
    assert "DERIVED" in profile.notes["source"]
    # batch-1 decode step of a 1k context ~ 12 ms: 60-120 tok/s is the plausible A100 8B range.
    t = profile.step.step_time(0, 1, 1000)
    assert 1 / 120 < t < 1 / 60


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError):
        SimRequest("x", 0.0, 0, 5)
    with pytest.raises(ValueError):
        StepTimeModel(a=-1, b=0, c=0, d=0)
    with pytest.raises(ValueError):
        ClusterConfig(router="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        simulate(build_requests([100_000], [1], [0.0]), unit_profile(num_kv_blocks=10),
                 ClusterConfig(policy=PolicyConfig(name="fcfs")))


def test_fit_recovers_known_step_model() -> None:
    from ltr.sim.calibrate import StepSample, fit_step_model

    truth = StepTimeModel(a=0.02, b=3e-4, c=2e-3, d=1e-6)
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(60):
        p, s, kv = int(rng.integers(0, 2000)), int(rng.integers(1, 32)), int(rng.integers(10, 20000))
        t = truth.step_time(p, s, kv) * (1 + 0.01 * rng.standard_normal())
        samples.append(StepSample(p, s, kv, t))
    fitted, quality = fit_step_model(samples)
    assert fitted.a == pytest.approx(truth.a, rel=0.15)
    assert fitted.b == pytest.approx(truth.b, rel=0.15)
    assert fitted.c == pytest.approx(truth.c, rel=0.15)
    assert quality["mean_abs_rel_error"] < 0.05
    with pytest.raises(ValueError):
        fit_step_model(samples[:3])


def test_simulate_command_on_a_trace(tmp_path, capsys) -> None:
    import json

    from ltr.cli import main

    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"prompt": "p", "prompt_len": 20 + i, "output_len": 5 + 7 * i}) + "\n"
                             for i in range(30)))
    assert main(["simulate", "--trace", str(trace), "--policy", "ltr", "--scores", "oracle", "--rate", "0",
                 "--replicas", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 30 and summary["replicas"] == 2
    assert main(["simulate", "--trace", str(tmp_path / "missing.jsonl")]) == 2
