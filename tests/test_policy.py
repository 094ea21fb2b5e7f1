"""Pure tests of the scheduling policy core (no vLLM): ordering, aging, preemption choice, config."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltr.scheduling.length_distribution import LengthDistribution
from ltr.scheduling.policy import (
    FCFSPolicy,
    GittinsPolicy,
    MLFQPolicy,
    PolicyConfig,
    PriorityPolicy,
    RankPolicy,
    RankState,
    SchedulingPolicy,
    StarvationConfig,
    UNSCORED_PRIORITY,
    admissible_count,
    usable_score,
)

scores = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))


def _states(values: list[float | None]) -> list[RankState]:
    return [RankState(request_id=f"r{i}", arrival=float(i), score=v) for i, v in enumerate(values)]


def test_usable_score_rejects_missing_and_non_finite() -> None:
    assert usable_score(None) is None
    assert usable_score(float("nan")) is None
    assert usable_score(float("inf")) is None
    assert usable_score(-math.inf) is None
    assert usable_score("not a number") is None
    assert usable_score(2) == 2.0
    assert usable_score("1.5") == 1.5


@given(st.lists(scores, min_size=1, max_size=40))
def test_rank_order_is_ascending_score_with_unscored_first_by_arrival(values: list[float | None]) -> None:
    ordered = RankPolicy(starvation=None).order(_states(values))
    unscored = [s for s in ordered if usable_score(s.score) is None]
    scored = [s for s in ordered if usable_score(s.score) is not None]
    assert ordered == unscored + scored
    assert [s.arrival for s in unscored] == sorted(s.arrival for s in unscored)
    keys = [(usable_score(s.score), s.arrival) for s in scored]
    assert keys == sorted(keys)


@given(st.lists(scores, min_size=1, max_size=40))
def test_fcfs_ignores_scores(values: list[float | None]) -> None:
    states = _states(values)
    assert FCFSPolicy().order(reversed(states)) == states


def test_priority_quantizes_score_and_orders_like_vllm() -> None:
    policy = PriorityPolicy(levels_per_unit=2.0)
    assert policy.priority_of(1.3) == 2
    # Unscored requests go ahead of every ranked one (the score convention), even very negative scores.
    assert policy.priority_of(None) == policy.priority_of(float("nan")) == UNSCORED_PRIORITY
    assert policy.priority_of(None) < policy.priority_of(-1e30)
    ordered = policy.order(_states([3.0, 0.2, 1.4, 0.4, None, -50.0, None]))
    # 0.2 and 0.4 share level 0 -> arrival breaks the tie; unscored first, in arrival order.
    assert [s.request_id for s in ordered] == ["r4", "r6", "r5", "r1", "r3", "r2", "r0"]


def test_mlfq_demotes_with_service_and_skip_join_places_long_prompts_lower() -> None:
    policy = MLFQPolicy(base_quantum=4, num_levels=4, skip_join=True)
    fresh = RankState("a", 0.0, prompt_len=1)
    assert policy.level(fresh) == 0
    fresh.served_tokens = 4
    assert policy.level(fresh) == 1
    fresh.served_tokens = 4 + 8
    assert policy.level(fresh) == 2
    fresh.served_tokens = 10_000
    assert policy.level(fresh) == 3  # capped at the last level
    assert policy.level(RankState("b", 0.0, prompt_len=20)) == 3
    assert MLFQPolicy(base_quantum=4, num_levels=4, skip_join=False).level(
        RankState("c", 0.0, prompt_len=20)) == 0


def test_starvation_promotes_after_threshold_for_quantum_scheduled_iterations() -> None:
    policy = RankPolicy(starvation=StarvationConfig(threshold=3, quantum=2))
    short, long = RankState("s", 0.0, score=1.0), RankState("l", 1.0, score=9.0)
    policy.track(short)
    policy.track(long)
    for _ in range(3):
        policy.observe_step({"s": 1})
    assert long.promoted and policy.stats.promotions == 1 and policy.last_promoted == [long]
    assert policy.order([short, long])[0] is long
    policy.observe_step({"l": 1})
    assert policy.last_promoted == [] and policy.last_expired == []
    policy.observe_step({"s": 1})  # not scheduled: quantum is not spent
    assert long.promoted_left == 1
    policy.observe_step({"l": 1})
    # The promotion ran out: its key changed, which callers keeping requests in order must hear of.
    assert not long.promoted and policy.order([short, long])[0] is short and policy.last_expired == [long]
    assert long.served_tokens == 2


def test_no_starvation_config_never_promotes() -> None:
    policy = RankPolicy(starvation=None)
    long = RankState("l", 0.0, score=9.0)
    policy.track(long)
    for _ in range(1000):
        policy.observe_step({})
    assert not long.promoted and policy.stats.promotions == 0


def _simulate(policy: SchedulingPolicy, capacity: int, long_len: int, arrivals: list[int],
              max_iters: int) -> tuple[int | None, int]:
    """Iteration-level loop: each iteration the top-`capacity` requests by policy order get one token.

    Short requests (1 token, better scores than the long one, each new one slightly worse than the
    last, so shorts are served among themselves in arrival order) arrive `arrivals[i % len]` per
    iteration.
    Returns (iteration at which the long request finished or None, its longest unscheduled streak).
    """
    long = RankState("long", arrival=0.0, score=1e6)
    remaining = {"long": long_len}
    live = [long]
    policy.track(long)
    streak = longest = 0
    seq = 0
    for it in range(max_iters):
        for _ in range(arrivals[it % len(arrivals)]):
            seq += 1
            state = RankState(f"s{seq}", arrival=it + seq * 1e-6, score=float(seq))
            remaining[state.request_id] = 1
            live.append(state)
            policy.track(state)
        batch = policy.order(live)[:capacity]
        scheduled = {s.request_id: 1 for s in batch}
        policy.observe_step(scheduled, {s.request_id: long_len - remaining[s.request_id] + 1 if s is long else 1
                                        for s in batch})
        streak = 0 if "long" in scheduled else streak + 1
        longest = max(longest, streak)
        for s in batch:
            remaining[s.request_id] -= 1
            if remaining[s.request_id] == 0:
                policy.forget(s.request_id)
        live = [s for s in live if remaining[s.request_id] > 0]
        if remaining["long"] == 0:
            return it, longest
    return None, longest


#: Scores below 1e5 are one-token requests, above it 500-700 tokens (the long request of `_simulate`).
STREAM_TABLE = LengthDistribution(edges=(1e5,), bins=((1.0, 1.0, 1.0), (500.0, 600.0, 700.0)), pooled=(1.0, 700.0))


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 4), threshold=st.integers(2, 40), quantum=st.integers(1, 6),
       long_len=st.integers(1, 20), gittins=st.booleans())
def test_starvation_bound_holds_under_an_endless_stream_of_better_requests(
        capacity: int, threshold: int, quantum: int, long_len: int, gittins: bool) -> None:
    # `capacity` better-ranked one-token requests arrive every iteration, so the long request only
    # runs when promoted. The backlog its promoted iterations leave (<= long_len) drains before any
    # short request itself starves when long_len / capacity < threshold; then the bound is exact:
    # every `threshold` waiting iterations buy `quantum` iterations of service.
    if long_len >= threshold * capacity:
        long_len = threshold * capacity - 1
    arrivals = [capacity]
    bound = math.ceil(long_len / quantum) * (threshold + quantum)
    def build(starvation: StarvationConfig | None) -> SchedulingPolicy:
        return GittinsPolicy(STREAM_TABLE, starvation=starvation) if gittins else RankPolicy(starvation=starvation)

    policy = build(StarvationConfig(threshold=threshold, quantum=quantum))
    finished, longest_wait = _simulate(policy, capacity, long_len, arrivals, max_iters=bound + 1)
    assert finished is not None and finished <= bound
    assert longest_wait <= threshold
    # Without aging the same stream starves it for the whole horizon: the test can fail.
    unaged, _ = _simulate(build(None), capacity, long_len, arrivals, max_iters=bound + 1)
    assert unaged is None


@given(waiting=st.lists(st.floats(0, 100), max_size=12), running=st.lists(st.floats(0, 100), max_size=8),
       free_seats=st.integers(0, 12), max_victims=st.integers(0, 5))
def test_preemption_victims_are_worst_running_and_outranked(
        waiting: list[float], running: list[float], free_seats: int, max_victims: int) -> None:
    policy = RankPolicy(starvation=None)
    w = [RankState(f"w{i}", 100.0 + i, score=v) for i, v in enumerate(waiting)]
    r = [RankState(f"r{i}", float(i), score=v) for i, v in enumerate(running)]
    worst_first = sorted(r, key=policy.sort_key, reverse=True)
    victims = policy.preemption_victims(policy.order(w), worst_first, free_seats, max_victims)
    assert len(victims) <= max_victims
    assert len(victims) <= max(len(w) - free_seats, 0)
    assert victims == worst_first[:len(victims)]
    blocked = policy.order(w)[free_seats:]
    for candidate, victim in zip(blocked, victims):
        assert policy.sort_key(candidate) < policy.sort_key(victim)
    assert FCFSPolicy().preemption_victims(w, r, free_seats, max_victims) == []


@pytest.mark.parametrize("keep_seat", [True, False])
def test_aged_requests_keep_their_seat_unless_the_paper_rule_is_chosen(keep_seat: bool) -> None:
    policy = RankPolicy(starvation=StarvationConfig(threshold=2, quantum=1, keep_seat=keep_seat))
    old = RankState("old", 0.0, score=50.0)
    policy.track(old)
    for _ in range(2):
        policy.observe_step({})
    assert old.aged and old.promoted
    policy.observe_step({"old": 1})   # the quantum is spent; it now ranks by its score again
    assert not old.promoted and old.aged
    fresh = RankState("fresh", 1.0, score=40.0)
    newcomer = RankState("new", 2.0, score=1.0)
    victims = policy.preemption_victims([newcomer], [old, fresh], free_seats=0, max_victims=1)
    assert victims == ([fresh] if keep_seat else [old])
    # Out of KV, engines evict from the end of the running batch: the aged request sits ahead of the
    # better-ranked fresh one under keep_seat (the last victim), by its rank otherwise.
    batch = sorted([old, fresh, newcomer], key=policy.running_key)
    assert batch[-1] is (fresh if keep_seat else old)
    assert batch[0] is (old if keep_seat else newcomer)


def test_admissible_count_stops_at_the_first_request_that_does_not_fit() -> None:
    # (required, taken): a prompt must fit whole but admission takes only its first chunk.
    assert admissible_count([(4, 1), (4, 1), (4, 1)], seats=8, free_blocks=5) == 2
    assert admissible_count([(4, 4), (1, 1)], seats=8, free_blocks=5) == 2
    assert admissible_count([(6, 1), (1, 1)], seats=8, free_blocks=5) == 0   # no skipping past a blocked one
    assert admissible_count([(1, 1)] * 5, seats=3, free_blocks=99) == 3
    assert admissible_count([(1, 1)], seats=0, free_blocks=99) == 0
    assert admissible_count(iter([]), seats=3, free_blocks=9) == 0


def test_aged_share_caps_aged_requests_in_flight_longest_waiter_first() -> None:
    starvation = StarvationConfig(threshold=3, quantum=2, aged_share=0.25)
    assert starvation.max_aged(8) == 2 and starvation.max_aged(2) == 1
    policy = RankPolicy(starvation=starvation, max_num_seqs=8)
    states = [RankState(f"r{i}", float(i), score=100.0 - i) for i in reversed(range(5))]
    for state in states:   # one arrival per step: r4 has waited longest
        policy.track(state)
        policy.observe_step({})
    assert [s.request_id for s in states if s.aged] == ["r4", "r3"]
    assert policy.stats.promotions == 2
    # Aged requests keep their cap slot until they leave the engine; then the next waiter ages.
    policy.observe_step({})
    assert [s.request_id for s in states if s.aged] == ["r4", "r3"]
    policy.forget("r4")
    policy.observe_step({})
    assert [s.request_id for s in states if s.aged] == ["r4", "r3", "r2"]
    # Equal waits: the earlier arrival ages first, also when both last ran in the same step.
    tied = RankPolicy(starvation=starvation, max_num_seqs=4)
    early, late = RankState("early", 1.0, score=1.0), RankState("late", 2.0, score=1.0)
    tied.track(early)
    tied.track(late)
    tied.observe_step({"late": 1, "early": 1})
    for _ in range(3):
        tied.observe_step({})
    assert early.aged and not late.aged
    # Unbounded when the policy is not told the batch size (pure ordering use).
    unbounded = RankPolicy(starvation=starvation)
    fresh = [RankState(f"u{i}", float(i), score=1.0) for i in range(5)]
    for state in fresh:
        unbounded.track(state)
    for _ in range(3):
        unbounded.observe_step({})
    assert all(s.aged for s in fresh)


def test_preemption_patience_lets_only_long_waiters_evict() -> None:
    policy = RankPolicy(starvation=None, preemption_patience=3)
    running = [RankState("long", 0.0, score=90.0)]
    eager = RankState("eager", 1.0, score=1.0)
    policy.track(eager)
    for _ in range(2):
        policy.observe_step({"long": 1})
    assert policy.waited(eager) == 2
    assert policy.preemption_victims([eager], running, free_seats=0, max_victims=1) == []
    policy.observe_step({"long": 1})
    assert policy.preemption_victims([eager], running, free_seats=0, max_victims=1) == running
    promoted = RankState("promoted", 2.0, score=95.0, promoted_left=1)
    assert policy.preemption_victims([promoted], running, free_seats=0, max_victims=1) == running


def test_policy_config_round_trip_and_clear_errors() -> None:
    for config in (PolicyConfig(), PolicyConfig(name="mlfq", starvation=None, mlfq_base_quantum=8),
                   PolicyConfig(name="priority", priority_levels_per_unit=0.5),
                   PolicyConfig(starvation=StarvationConfig(50, 5, aged_share=0.5), preemption_patience=0),
                   PolicyConfig(starvation=StarvationConfig(aged_share=None, keep_seat=False))):
        assert PolicyConfig.from_mapping(config.to_mapping()) == config
    assert isinstance(PolicyConfig(name="fcfs").build(), FCFSPolicy)
    assert PolicyConfig.from_mapping({"starvation": {"threshold": 5}}).starvation == StarvationConfig(5, 10)
    assert PolicyConfig.from_mapping({"starvation": {"aged_share": 1}}).starvation == StarvationConfig(aged_share=1.0)
    with pytest.raises(ValueError, match="aged_share must be in"):
        PolicyConfig.from_mapping({"starvation": {"aged_share": 0}})
    with pytest.raises(ValueError, match="aged_share must be a number"):
        PolicyConfig.from_mapping({"starvation": {"aged_share": "half"}})
    with pytest.raises(ValueError, match="keep_seat must be a bool"):
        PolicyConfig.from_mapping({"starvation": {"keep_seat": "yes"}})
    with pytest.raises(ValueError, match="preemption_patience must be >= 0"):
        PolicyConfig.from_mapping({"preemption_patience": -1})
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        PolicyConfig.from_mapping({"name": "sjf"})
    with pytest.raises(ValueError, match="unknown policy config key"):
        PolicyConfig.from_mapping({"threshold": 3})
    with pytest.raises(ValueError, match="starvation threshold must be >= 1"):
        PolicyConfig.from_mapping({"starvation": {"threshold": 0, "quantum": 1}})
    with pytest.raises(ValueError, match="must be an integer"):
        PolicyConfig.from_mapping({"max_preemptions_per_step": 1.5})
    with pytest.raises(ValueError, match="unknown starvation key"):
        PolicyConfig.from_mapping({"starvation": {"limit": 3}})
    with pytest.raises(ValueError, match="mapping"):
        PolicyConfig.from_mapping(["ltr"])  # type: ignore[arg-type]


# -- Gittins index over the calibrated length distribution ---------------------------------------------

#: Bin 0 (scores < 0): 1-40 tokens; bin 1: 300-900; pooled tail to 4,000.
TABLE = LengthDistribution(edges=(0.0,), bins=((1.0, 10.0, 20.0, 40.0), (300.0, 500.0, 700.0, 900.0)),
                           pooled=(1.0, 20.0, 300.0, 700.0, 4000.0))


def _gittins(**kwargs) -> GittinsPolicy:
    return GittinsPolicy(TABLE, **{"starvation": None, **kwargs})


def test_gittins_orders_fresh_requests_by_predicted_distribution_unscored_first() -> None:
    policy = _gittins()
    states = _states([5.0, -3.0, None, 0.5, -0.5, float("nan")])
    order = [s.request_id for s in policy.order(states)]
    assert order[:2] == ["r2", "r5"]   # unscored by arrival, ahead of ranked work
    assert order[2:] == ["r1", "r4", "r0", "r3"]   # bin 0 before bin 1, each by arrival


def test_gittins_key_moves_only_at_boundaries_and_an_outlived_prediction_loses_priority() -> None:
    policy = _gittins()
    short = RankState("short", 0.0, score=-1.0, prompt_len=4)
    policy.track(short)
    fresh_short_key = policy.sort_key(RankState("fresh", 1.0, score=-1.0, prompt_len=4))
    keys, moves = [policy.sort_key(short)], 0
    for generated in range(1, 60):
        policy.observe_step({"short": 1}, {"short": generated})
        moves += short in policy.last_moved
        if short not in policy.last_moved:
            assert policy.sort_key(short) == keys[-1]   # no boundary crossed: the cached key stands
        keys.append(policy.sort_key(short))
    # Moves at the bin's boundaries 1, 10, 20 and 40 only.
    assert moves == 4
    # Past its bin's largest length it follows the pooled tail: now behind a fresh request of its bin.
    assert keys[0] < fresh_short_key < keys[-1]
    assert short.next_boundary == 300.0


def test_gittins_counts_the_prefill_still_owed_then_forgets_it() -> None:
    policy = _gittins(prefill_weight=2.0)
    long_prompt = RankState("a", 0.0, score=-1.0, prompt_len=400)
    short_prompt = RankState("b", 1.0, score=-1.0, prompt_len=4)
    assert policy.sort_key(short_prompt) < policy.sort_key(long_prompt)
    for state in (long_prompt, short_prompt):
        policy.track(state)
    policy.observe_step({"a": 400, "b": 4}, {"a": 1, "b": 1})
    assert {s.request_id for s in policy.last_moved} == {"a", "b"}
    assert policy.rank_key(long_prompt) == policy.rank_key(short_prompt)
    # Without the weight, prompts are free from the start.
    free = _gittins()
    assert free.rank_key(RankState("c", 0.0, score=-1.0, prompt_len=400)) == \
        free.rank_key(RankState("d", 0.0, score=-1.0, prompt_len=4))


def test_gittins_preempts_an_outlived_request_for_fresh_short_work() -> None:
    policy = _gittins(preemption_patience=0)
    veteran = RankState("veteran", 0.0, score=-1.0)
    policy.track(veteran)
    policy.observe_step({"veteran": 1}, {"veteran": 45})
    newcomer = RankState("new", 1.0, score=-1.0)
    policy.track(newcomer)
    assert policy.preemption_victims([newcomer], [veteran], free_seats=0, max_victims=1) == [veteran]
    # Static LTR, same scores: equal rank, the veteran keeps its seat.
    static = RankPolicy(starvation=None)
    assert static.preemption_victims([newcomer], [veteran], free_seats=0, max_victims=1) == []


def test_gittins_config_builds_from_the_shipped_distribution_and_round_trips(tmp_path) -> None:
    config = PolicyConfig()
    assert config.name == "gittins" and config.runs_rank_scheduler
    policy = config.build(256)
    assert isinstance(policy, GittinsPolicy) and policy.moves_keys and policy.prefill_weight == 2.0
    path = tmp_path / "dist.json"
    path.write_text(json.dumps(TABLE.to_mapping()))
    custom = PolicyConfig(gittins_per_token=False, gittins_prefill_weight=0.5, length_distribution=str(path))
    assert PolicyConfig.from_mapping(custom.to_mapping()) == custom
    assert custom.build().distribution == TABLE
    with pytest.raises(ValueError, match="gittins_prefill_weight must be"):
        PolicyConfig(gittins_prefill_weight=-1.0)
    with pytest.raises(ValueError, match="length_distribution must be a path"):
        PolicyConfig.from_mapping({"length_distribution": 3})
    with pytest.raises(FileNotFoundError):
        PolicyConfig(length_distribution=str(tmp_path / "missing.json")).build()


@given(st.lists(st.tuples(scores, st.booleans()), min_size=1, max_size=40))
def test_requests_awaiting_their_score_queue_behind_all_other_work_by_arrival(
        requests: list[tuple[float | None, bool]]) -> None:
    """Whatever score a request sent ahead of its score came with (neutral, none), it waits behind every other
    request, promoted or not, under every policy that ranks by score; once its score lands it is ranked by it."""
    for policy in (RankPolicy(starvation=None), _gittins()):
        states = _states([score for score, _ in requests])
        for state, (_, pending) in zip(states, requests):
            state.score_pending = pending
        states[0].promoted_left = 3   # promoted work too stays ahead
        ordered = policy.order(states)
        settled = [s for s in ordered if not s.score_pending]
        waiting = [s for s in ordered if s.score_pending]
        assert ordered == settled + waiting
        assert [s.arrival for s in waiting] == sorted(s.arrival for s in waiting)
        assert [s.request_id for s in settled] == [s.request_id for s in policy.order(
            [s for s in states if not s.score_pending])]
        for state in waiting:   # the score lands: the request is ranked by it
            state.score_pending, state.key_cache = False, None
        fresh = _states([score for score, _ in requests])
        fresh[0].promoted_left = 3
        assert [s.request_id for s in policy.order(states)] == [s.request_id for s in policy.order(fresh)]


def test_only_policies_that_rank_by_score_take_scores_after_arrival() -> None:
    assert [name for name in ("fcfs", "priority", "mlfq", "ltr", "gittins")
            if PolicyConfig(name=name).reranks_by_late_scores] == ["ltr", "gittins"]
