"""Late scores: the file channel into the scheduler, and the re-ranking when a score lands."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm.v1.request import RequestStatus

from ltr.scheduling.policy import PolicyConfig
from ltr.data.served_log import VERSION_KEY
from ltr.scheduling.engine import SCORE_KEY
from ltr.scheduling.score_updates import ScoreUpdate, ScoreUpdateReader, append_score_update
from ltr.scheduling.vllm_scheduler import RankScheduler

from sched_harness import Driver, make_request, make_scheduler

#: Rank order only and no eviction, so queue and batch order show the re-ranking alone.
ORDER_ONLY = PolicyConfig(name="ltr", starvation=None, max_preemptions_per_step=0)


def one_seat(model_path: Path, updates: Path, async_scheduling: bool) -> tuple[RankScheduler, Driver]:
    """A rank scheduler with one seat, reading late scores from `updates`, and its driver."""
    scheduler = make_scheduler(model_path, RankScheduler, policy=ORDER_ONLY, async_scheduling=async_scheduling,
                               max_num_seqs=1, num_blocks=200, block_size=16, max_num_batched_tokens=256,
                               score_updates_path=str(updates))
    return scheduler, Driver(scheduler)


def requests_named(suffix: str):
    """Requests as vLLM's engine names them (the caller's id plus `suffix`), the caller's id as late-score id."""
    def request(name: str, score: float, pending: bool = False, max_tokens: int = 4):
        return make_request(name + suffix, 16, max_tokens, score, late_score_id=name, score_pending=pending)
    return request


def test_reader_returns_each_complete_line_once(tmp_path: Path) -> None:
    path = tmp_path / "updates.jsonl"
    reader = ScoreUpdateReader(path)
    assert reader.read() == []   # not written yet
    append_score_update(path, ScoreUpdate("a", 1.5))
    append_score_update(path, ScoreUpdate("b\tc", -2.0, {"ltr_predictor_version": "v1"}))
    append_score_update(path, ScoreUpdate("d", None, final=False))
    append_score_update(path, ScoreUpdate("e", float("nan")))   # not a usable score: sent as none
    assert reader.read() == [ScoreUpdate("a", 1.5), ScoreUpdate("b\tc", -2.0, {"ltr_predictor_version": "v1"}),
                             ScoreUpdate("d", None, final=False), ScoreUpdate("e", None)]
    assert reader.read() == []
    with open(path, "a") as handle:
        handle.write('{"id": "f", "score": "many"}\nnot json\n{"id": "g", "sco')   # malformed, then half-written
    assert reader.read() == []
    with open(path, "a") as handle:
        handle.write('re": 3.25}\n')
    assert reader.read() == [ScoreUpdate("g", 3.25)]
    reader.close()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_late_score_re_ranks_waiting_and_running_requests(tiny_model_path: Path, tmp_path: Path,
                                                            async_scheduling: bool) -> None:
    path = tmp_path / "updates.jsonl"
    scheduler = make_scheduler(tiny_model_path, RankScheduler, policy=ORDER_ONLY, async_scheduling=async_scheduling,
                               max_num_seqs=2, num_blocks=200, block_size=16, max_num_batched_tokens=256,
                               score_updates_path=str(path))
    driver = Driver(scheduler)

    def named(name: str, max_tokens: int, score: float):
        # As vLLM's engine names it: the caller's id plus a random suffix; the caller's id rides along.
        return make_request(f"{name}-3f9a2c1d", 16, max_tokens, score, late_score_id=name)

    running = [named("run-short", 80, 5.0), named("run-neutral", 80, 50.0)]
    for request in running:
        driver.add(request)
    for _ in range(3):
        driver.step()
    assert scheduler.stats()["admitted_awaiting_score"] == 2   # admitted before any late score came
    waiting = [named("wait-short", 4, 10.0), named("wait-neutral", 4, 50.0)]
    for request in waiting:
        driver.add(request)
    driver.step()
    def names(requests) -> list[str]:
        return [r.request_id.removesuffix("-3f9a2c1d") for r in requests]

    assert names(scheduler.running) == ["run-short", "run-neutral"]
    assert names(scheduler.waiting) == ["wait-short", "wait-neutral"]
    # The predictor's late answers: both "neutral" requests are in fact the shortest.
    append_score_update(path, ScoreUpdate("wait-neutral", 1.0))
    append_score_update(path, ScoreUpdate("run-neutral", 1.0))
    append_score_update(path, ScoreUpdate("gone", 1.0))   # a request the engine does not hold: ignored
    driver.step()
    assert names(scheduler.waiting) == ["wait-neutral", "wait-short"]
    assert names(scheduler.running) == ["run-neutral", "run-short"]
    assert scheduler.stats()["late_scores"] == 2
    driver.run_until_idle(max_steps=600)
    # wait-short's score never came: it too was admitted at its neutral place; wait-neutral by its own score.
    assert scheduler.stats()["admitted_awaiting_score"] == 3
    # With seats freed, the re-ranked waiting request is admitted first.
    assert driver.finish_order.index("wait-neutral-3f9a2c1d") < driver.finish_order.index("wait-short-3f9a2c1d")
    assert all(scheduler.rank_states.get(r.request_id) is None for r in running + waiting)
    assert scheduler._late_score_ids == {}
    assert RequestStatus.RUNNING not in {r.status for r in waiting}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_request_sent_ahead_of_its_score_never_takes_a_seat_ranked_work_waits_for(
        tiny_model_path: Path, tmp_path: Path, async_scheduling: bool) -> None:
    """One seat, held by a blocker. A request sent ahead of its score queues behind every ranked request,
    whatever neutral score it came with; its own score, when it lands, ranks it; a release without a score
    leaves it at its neutral score, and a score landing after that re-ranks it again. On an idle engine it
    is admitted at once, before its score."""
    path = tmp_path / "updates.jsonl"
    scheduler, driver = one_seat(tiny_model_path, path, async_scheduling)
    suffix = "-77aa"
    request = requests_named(suffix)

    def waiting() -> list[str]:
        return [r.request_id.removesuffix(suffix) for r in scheduler.waiting]

    driver.add(request("blocker", 0.0, max_tokens=40))
    driver.step()
    for item in (request("short", 5.0), request("p", 1.0, pending=True), request("long", 50.0),
                 request("q", 2.0, pending=True)):
        driver.add(item)
    driver.step()
    assert waiting() == ["short", "long", "p", "q"]   # the pending ones behind all ranked work, by arrival
    append_score_update(path, ScoreUpdate("p", 10.0, {VERSION_KEY: "v7"}))   # p's own score
    append_score_update(path, ScoreUpdate("q", None, final=False))          # q released: its score is late
    driver.step()
    assert waiting() == ["q", "short", "p", "long"]   # q at its neutral 2.0, p at its own 10.0
    p = scheduler.requests["p" + suffix]
    assert p.sampling_params.extra_args[SCORE_KEY] == 10.0 and p.sampling_params.extra_args[VERSION_KEY] == "v7"
    append_score_update(path, ScoreUpdate("q", 99.0))   # q's own score, after all
    driver.step()
    assert waiting() == ["short", "p", "long", "q"]
    stats = scheduler.stats()
    assert (stats["followed_scores"], stats["late_scores"], stats["admitted_before_score"]) == (1, 1, 0)
    driver.run_until_idle(max_steps=800)
    assert [name.removesuffix(suffix) for name in driver.finish_order] == ["blocker", "short", "p", "long", "q"]
    # An idle engine admits a request at once, before its score.
    driver.add(request("alone", 3.0, pending=True))
    driver.step()
    assert [r.request_id for r in scheduler.running] == ["alone" + suffix]
    assert scheduler.stats()["admitted_before_score"] == 1
    driver.run_until_idle(max_steps=1600)
    assert scheduler._late_score_ids == {}


def test_a_score_that_comes_before_its_request_is_applied_when_the_request_arrives(
        tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica can write a late score while vLLM's serving layer still prepares the request (a burst of
    long chats): the scheduler reads it before the request is added. It is kept, and the request takes its
    score, version and place when it comes; one for a request that never comes is forgotten in time."""
    import ltr.scheduling.vllm_scheduler as vllm_scheduler

    path = tmp_path / "updates.jsonl"
    scheduler, driver = one_seat(tiny_model_path, path, async_scheduling=False)
    suffix = "-5e5e"
    request = requests_named(suffix)

    driver.add(request("blocker", 0.0, max_tokens=40))
    driver.step()
    driver.add(request("short", 5.0))
    append_score_update(path, ScoreUpdate("early", 1.0, {VERSION_KEY: "v3"}))   # before "early" is added
    append_score_update(path, ScoreUpdate("never", 2.0))
    driver.step()
    driver.add(request("early", 3.0, pending=True))   # sent ahead of its score, which is already in
    driver.step()
    assert [r.request_id.removesuffix(suffix) for r in scheduler.waiting] == ["early", "short"]
    early = scheduler.requests["early" + suffix]
    assert early.sampling_params.extra_args[SCORE_KEY] == 1.0 and early.sampling_params.extra_args[VERSION_KEY] == "v3"
    assert scheduler.stats()["followed_scores"] == 1
    assert "early" not in scheduler._late_score_ids and set(scheduler._early_updates) == {"never"}
    monkeypatch.setattr(vllm_scheduler, "EARLY_SCORE_TTL_S", 0.0)
    driver.step()
    assert scheduler._early_updates == {}
    driver.run_until_idle(max_steps=800)
    assert [name.removesuffix(suffix) for name in driver.finish_order] == ["blocker", "early", "short"]
