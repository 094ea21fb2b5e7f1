"""The vLLM internals the adapter relies on are present, and a missing one or an untested version is named."""

from __future__ import annotations

import pytest

from ltr.scheduling import upstream


def test_installed_vllm_is_tested_and_has_every_internal(tiny_model_path) -> None:
    from sched_harness import make_request, make_scheduler

    from ltr.scheduling.policy import PolicyConfig
    from ltr.scheduling.vllm_scheduler import RankScheduler

    assert upstream.version_problem() is None
    scheduler = make_scheduler(tiny_model_path, RankScheduler, policy=PolicyConfig(), async_scheduling=False,
                               max_num_seqs=4, num_blocks=64)
    assert upstream.missing_upstream_internals(scheduler, make_request("r", 8, 4, 1.0)) == []


def test_a_missing_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.delattr(Scheduler, "_request_blocks_can_be_freed")
    missing = upstream.missing_upstream_internals()
    assert missing == ["Scheduler._request_blocks_can_be_freed"]
    with pytest.raises(RuntimeError, match="lacks internals the rank scheduler uses: "
                                           r"Scheduler\._request_blocks_can_be_freed"):
        upstream.check_upstream()


def test_a_changed_signature_and_instance_attributes_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "schedule", lambda self: None)
    assert upstream.missing_upstream_internals() == ["Scheduler.schedule(throttle_prefills=...)"]
    monkeypatch.undo()

    class Bare:
        kv_cache_manager = object()

    missing = upstream.missing_upstream_internals(Bare(), object())
    assert "Scheduler().max_num_active_reqs" in missing and "Scheduler().kv_holding_waiting" in missing
    assert "Scheduler().kv_cache_manager.coordinator.find_longest_cache_hit" in missing
    assert "Request().num_stale_output_tokens" in missing


def test_untested_vllm_version_fails_clearly_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(upstream.ALLOW_UNTESTED_ENV, raising=False)
    assert upstream.version_problem("0.32.0+cpu") is None
    problem = upstream.version_problem("0.33.0")
    assert problem and "installed vLLM is 0.33.0" in problem and upstream.ALLOW_UNTESTED_ENV in problem
    monkeypatch.setenv(upstream.ALLOW_UNTESTED_ENV, "1")
    assert upstream.version_problem("0.33.0") is None
