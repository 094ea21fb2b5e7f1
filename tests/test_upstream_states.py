"""The adapter under vLLM's scheduler states: it evicts a running request only for one upstream admits now.

Each case sets up the same conflict on the hand-driven scheduler (``sched_harness``): long, badly ranked
requests fill the seats and short, well-ranked ones wait. Normally the adapter rank-preempts the long
ones. In each upstream state below upstream will not admit the short ones this step (or has room for them
without evicting), so an eviction would only throw the long requests' work away.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.request import Request, RequestStatus

from ltr.scheduling.policy import PolicyConfig
from ltr.scheduling.vllm_scheduler import RankScheduler

from sched_harness import (
    Driver,
    _block_hasher,
    expected_tokens,
    fake_model_output,
    make_request,
    make_scheduler,
)

#: Rank order only, evict at once: any eviction these tests see is the adapter's choice.
EAGER = PolicyConfig(name="ltr", starvation=None, preemption_patience=0, max_preemptions_per_step=4)
BLOCK = 16


def _scheduler(model: Path, async_scheduling: bool = False, **overrides):
    settings = {"max_num_seqs": 2, "num_blocks": 200, "block_size": BLOCK, "max_num_batched_tokens": 256,
                **overrides}
    return make_scheduler(model, RankScheduler, policy=EAGER, async_scheduling=async_scheduling, **settings)


def _longs_running(driver: Driver, count: int = 2) -> list[Request]:
    """`count` long, badly ranked requests admitted and decoding."""
    longs = [make_request(f"long{i}", 20, 60, 100.0 + i) for i in range(count)]
    for request in longs:
        driver.add(request)
    for _ in range(4):
        driver.step()
    assert all(r.status == RequestStatus.RUNNING for r in longs)
    return longs


def _add_shorts(driver: Driver, count: int = 2) -> list[Request]:
    shorts = [make_request(f"short{i}", 12, 3, float(i)) for i in range(count)]
    for request in shorts:
        driver.add(request)
    return shorts


def _finish(driver: Driver, requests: list[Request]) -> None:
    driver.run_until_idle(max_steps=600)
    for request in requests:
        log = driver.logs[request.request_id]
        assert log.tokens == expected_tokens(request.request_id, request.max_tokens), request.request_id


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_rank_preemption_happens_in_the_plain_case(tiny_model_path: Path, async_scheduling: bool) -> None:
    # The control: without any upstream state in the way, the short ones evict and finish first.
    driver = Driver(_scheduler(tiny_model_path, async_scheduling))
    longs = _longs_running(driver)
    shorts = _add_shorts(driver)
    _finish(driver, longs + shorts)
    assert driver.scheduler.stats()["rank_preemptions"] >= 2
    assert driver.finish_order[:2] == ["short0", "short1"]


@pytest.mark.parametrize("pause", [PauseState.PAUSED_NEW, PauseState.PAUSED_ALL], ids=["new", "all"])
def test_no_rank_preemption_while_paused(tiny_model_path: Path, pause: PauseState) -> None:
    scheduler = _scheduler(tiny_model_path)
    driver = Driver(scheduler)
    longs = _longs_running(driver)
    shorts = _add_shorts(driver)
    scheduler.set_pause_state(pause)
    scheduled = []
    for _ in range(5):
        # The engine core stops stepping a scheduler paused for all; schedule() must still evict nobody.
        output = scheduler.schedule()
        scheduled.append(output.total_num_scheduled_tokens)
        driver._deliver(scheduler.update_from_output(output, fake_model_output(scheduler, output)))
    assert scheduler.stats()["rank_preemptions"] == 0
    assert all(r.status == RequestStatus.RUNNING for r in longs)
    assert all(r.status == RequestStatus.WAITING for r in shorts)
    # Paused for all nothing runs; paused for new requests the running ones keep decoding.
    assert scheduled == ([0] * 5 if pause == PauseState.PAUSED_ALL else [2] * 5)
    scheduler.set_pause_state(PauseState.UNPAUSED)
    _finish(driver, longs + shorts)
    assert scheduler.stats()["rank_preemptions"] >= 1   # unpaused, the ranking applies again


def test_no_rank_preemption_on_throttled_steps(tiny_model_path: Path) -> None:
    # DP prefill balancing (throttle_prefills) may defer every prefill of a step: no eviction for one.
    scheduler = _scheduler(tiny_model_path)
    driver = Driver(scheduler)
    longs = _longs_running(driver)
    shorts = _add_shorts(driver)
    scheduler.schedule = functools.partial(type(scheduler).schedule, scheduler, throttle_prefills=True)
    for _ in range(3):
        driver.step()
    assert scheduler.stats()["rank_preemptions"] == 0
    del scheduler.schedule
    _finish(driver, longs + shorts)
    assert scheduler.stats()["rank_preemptions"] >= 1


def test_seats_are_counted_against_max_num_active_reqs(tiny_model_path: Path) -> None:
    # 4 model-runner slots but only 2 admitted at once: with 2 running upstream admits nobody, so the
    # short ones need an eviction (counting slots, the adapter would think two seats free and wait).
    scheduler = _scheduler(tiny_model_path, max_num_seqs=4, max_num_active_seqs=2)
    assert scheduler.max_num_active_reqs == 2 < scheduler.max_num_running_reqs
    driver = Driver(scheduler)
    longs = _longs_running(driver)
    shorts = _add_shorts(driver)
    _finish(driver, longs + shorts)
    assert scheduler.stats()["rank_preemptions"] >= 2
    assert driver.finish_order[:2] == ["short0", "short1"]


@pytest.mark.parametrize("blocked", ["grammar", "stale_output"])
def test_waiting_requests_upstream_skips_evict_nobody(tiny_model_path: Path, blocked: str) -> None:
    # A request compiling its grammar, or with output of an earlier run still in flight, is skipped by
    # upstream's waiting loop: evicting a running request for it frees a seat nobody takes.
    scheduler = _scheduler(tiny_model_path)
    driver = Driver(scheduler)
    longs = _longs_running(driver)
    shorts = _add_shorts(driver, 1)
    short = shorts[0]
    if blocked == "grammar":
        short.status = RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR   # no grammar yet: skipped
    else:
        short.num_stale_output_tokens, short.drop_stale_output = 1, False
    for _ in range(3):
        driver.step()
    assert scheduler.stats()["rank_preemptions"] == 0
    assert all(r.status == RequestStatus.RUNNING for r in longs)
    short.status = RequestStatus.WAITING
    short.num_stale_output_tokens = 0
    _finish(driver, longs + shorts)
    assert scheduler.stats()["rank_preemptions"] >= 1 and driver.finish_order[0] == "short0"


def _request_with_prompt(request_id: str, prompt: list[int], max_tokens: int, score: float,
                         resumable: bool = False) -> Request:
    from vllm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args={"ltr_score": score})
    return Request(request_id=request_id, prompt_token_ids=prompt, sampling_params=params, pooling_params=None,
                   block_hasher=_block_hasher(BLOCK), arrival_time=1e9, resumable=resumable)


def test_a_prefix_cache_hit_fits_without_evicting(tiny_model_path: Path) -> None:
    # One seat of two is free, but the KV cache is nearly full: the waiting request's 160-token prompt
    # would need 10 more blocks, yet 9 of them are a prefix the running request already holds. Upstream
    # admits it sharing those blocks, so there is nothing to evict.
    scheduler = _scheduler(tiny_model_path, num_blocks=16, max_num_batched_tokens=512)
    driver = Driver(scheduler)
    prefix = list(range(100, 100 + 9 * BLOCK))
    holder = _request_with_prompt("holder", prefix + [7], 40, 100.0)
    driver.add(holder)
    for _ in range(3):
        driver.step()
    assert holder.status == RequestStatus.RUNNING
    free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    sharer = _request_with_prompt("sharer", prefix + list(range(5000, 5016)), 3, 1.0)
    assert -(-sharer.num_tokens // BLOCK) > free   # all its tokens would not fit
    driver.add(sharer)
    _finish(driver, [holder, sharer])
    assert scheduler.stats()["rank_preemptions"] == 0
    assert driver.finish_order[0] == "sharer"


def test_a_chunked_prompt_needs_only_its_first_chunk(tiny_model_path: Path) -> None:
    # Without vLLM's full-prompt gate (scheduler_reserve_full_isl=False) a long prompt is admitted once
    # its first chunk fits; the free blocks cover that chunk, so the adapter must not evict for it.
    scheduler = _scheduler(tiny_model_path, num_blocks=24, max_num_batched_tokens=64,
                           scheduler_reserve_full_isl=False)
    driver = Driver(scheduler)
    holder = make_request("holder", 200, 40, 100.0)
    driver.add(holder)
    for _ in range(6):
        driver.step()
    free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    long_prompt = make_request("chunked", 300, 2, 1.0)
    assert -(-long_prompt.num_tokens // BLOCK) > free >= 64 // BLOCK
    driver.add(long_prompt)
    driver.step()
    assert long_prompt.status == RequestStatus.RUNNING and holder.status == RequestStatus.RUNNING
    assert scheduler.stats()["rank_preemptions"] == 0
    driver.run_until_idle(max_steps=600)


def _session_between_chunks(driver: Driver) -> Request:
    """A streaming-input session whose first chunk is answered: it waits for more input
    (WAITING_FOR_STREAMING_REQ) in kv_holding_waiting, keeping its KV blocks and a model-runner seat."""
    session = _request_with_prompt("session", list(range(300, 320)), 2, 50.0, resumable=True)
    driver.add(session)
    for _ in range(4):
        driver.step()
    assert session.status == RequestStatus.WAITING_FOR_STREAMING_REQ
    assert driver.scheduler.num_waiting_for_streaming_input == 1
    assert session in list(driver.scheduler.kv_holding_waiting)
    return session


def test_a_streaming_session_between_chunks_holds_its_seat(tiny_model_path: Path) -> None:
    # The session and one long request take both seats: the short one must evict the long one.
    scheduler = _scheduler(tiny_model_path)
    driver = Driver(scheduler)
    _session_between_chunks(driver)
    long = make_request("long0", 20, 60, 100.0)
    driver.add(long)
    for _ in range(3):
        driver.step()
    assert long.status == RequestStatus.RUNNING
    short = _add_shorts(driver, 1)[0]
    driver.step()
    assert scheduler.stats()["rank_preemptions"] == 1 and long.status == RequestStatus.PREEMPTED
    assert short.status == RequestStatus.RUNNING
    scheduler.finish_requests("session", RequestStatus.FINISHED_ABORTED)
    _finish(driver, [long, short])


def test_kv_holding_requests_are_admitted_first_and_take_their_seats(tiny_model_path: Path) -> None:
    # The session's next chunk arrives with a short request: upstream serves kv_holding_waiting first, so
    # the one free seat goes to the session and the short one can only run by evicting the long one.
    scheduler = _scheduler(tiny_model_path)
    driver = Driver(scheduler)
    session = _session_between_chunks(driver)
    long = make_request("long0", 20, 60, 100.0)
    driver.add(long)
    for _ in range(3):
        driver.step()
    driver.add(_request_with_prompt("session", list(range(400, 408)), 2, 50.0, resumable=True))   # next chunk
    assert session.status == RequestStatus.WAITING and session in list(scheduler.kv_holding_waiting)
    assert scheduler.num_waiting_for_streaming_input == 0
    short = _add_shorts(driver, 1)[0]
    driver.step()
    assert long.status == RequestStatus.PREEMPTED and scheduler.stats()["rank_preemptions"] == 1
    assert session.status == RequestStatus.RUNNING and short.status == RequestStatus.RUNNING
    driver.step()
    scheduler.finish_requests("session", RequestStatus.FINISHED_ABORTED)
    _finish(driver, [long, short])
