"""The ingress's calls to every engine replica (`/v1/ltr/engine_stats`, `/metrics`), on Serve's broadcast
call shape: a replica that fails is left out and counted, the others still answer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from deployments.ingress import IngressSettings, OpenAIIngress

SETTINGS = IngressSettings(served_model_name="m")


class _Broadcast:
    """What `DeploymentHandle.broadcast(method)` returns: one answer (or exception) per running replica."""

    def __init__(self, answers: list) -> None:
        self.answers = answers

    async def results_async(self, timeout_s: float, return_exceptions: bool) -> list:
        assert return_exceptions and timeout_s == SETTINGS.engine_stats_timeout_s
        if isinstance(self.answers, Exception):
            raise self.answers
        return self.answers


def _every_engine(answers) -> tuple[dict, int]:
    calls: list[str] = []

    def broadcast(method: str) -> _Broadcast:
        calls.append(method)
        return _Broadcast(answers)

    ingress = SimpleNamespace(settings=SETTINGS, engine=SimpleNamespace(broadcast=broadcast))
    result = asyncio.run(OpenAIIngress._every_engine(ingress, "debug_stats"))
    assert calls == ["debug_stats"]
    return result


def test_a_failing_replica_is_left_out_and_counted() -> None:
    replicas, failures = _every_engine([{"replica": "a", "in_flight": 0}, RuntimeError("replica b died"),
                                        {"replica": "c", "in_flight": 2}])
    assert replicas == {"a": {"replica": "a", "in_flight": 0}, "c": {"replica": "c", "in_flight": 2}}
    assert failures == 1


@pytest.mark.parametrize("error", [TimeoutError("Timed out waiting for broadcast results."),
                                   RuntimeError("no replica running")])
def test_a_broadcast_that_fails_as_a_whole_gives_an_empty_answer(error: Exception) -> None:
    assert _every_engine(error) == ({}, 1)
