"""Late scores: the file channel into the scheduler, and the re-ranking when a score lands."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm.v1.request import RequestStatus

from ltr.scheduling.policy import PolicyConfig
from ltr.scheduling.score_updates import ScoreUpdateReader, append_score_update
from ltr.scheduling.vllm_scheduler import RankScheduler

from sched_harness import Driver, make_request, make_scheduler

#: Rank order only and no eviction, so queue and batch order show the re-ranking alone.
ORDER_ONLY = PolicyConfig(name="ltr", starvation=None, max_preemptions_per_step=0)


def test_reader_returns_each_complete_line_once(tmp_path: Path) -> None:
    path = tmp_path / "updates.tsv"
    reader = ScoreUpdateReader(path)
    assert reader.read() == []   # not written yet
    append_score_update(path, "a", 1.5)
    append_score_update(path, "b", -2.0)
    assert reader.read() == [("a", 1.5), ("b", -2.0)]
    assert reader.read() == []
    with open(path, "a") as handle:
        handle.write("c\tnot-a-number\nd\t3.")   # a malformed line, then a half-written one
    assert reader.read() == []
    with open(path, "a") as handle:
        handle.write("25\n")
    assert reader.read() == [("d", 3.25)]
    with pytest.raises(ValueError, match="tab or newline"):
        append_score_update(path, "bad\tid", 1.0)
    reader.close()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_late_score_re_ranks_waiting_and_running_requests(tiny_model_path: Path, tmp_path: Path,
                                                            async_scheduling: bool) -> None:
    path = tmp_path / "updates.tsv"
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
    append_score_update(path, "wait-neutral", 1.0)
    append_score_update(path, "run-neutral", 1.0)
    append_score_update(path, "gone", 1.0)   # a request the engine does not hold: ignored
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
