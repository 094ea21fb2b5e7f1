"""The engine core's own CPU session (ltr.scheduling.engine_session), in real spawned processes."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from ltr.scheduling.engine_session import SESSION_NICE_ENV, autogroup_enabled, engine_core_session

pytestmark = pytest.mark.skipif(not autogroup_enabled(), reason="the kernel does not schedule by autogroup")


def _report_session(queue: multiprocessing.Queue) -> None:
    engine_core_session()
    queue.put((os.getsid(0), Path("/proc/self/autogroup").read_text().split()))


def _session_of(name: str, env_value: str | None) -> tuple[int, list[str]]:
    """Start a process named `name` (as vLLM names its engine core) with the plugin's switch set to
    `env_value`, run the plugin in it, and return its session id and autogroup line."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    before = os.environ.get(SESSION_NICE_ENV)
    if env_value is None:
        os.environ.pop(SESSION_NICE_ENV, None)
    else:
        os.environ[SESSION_NICE_ENV] = env_value
    try:
        child = context.Process(target=_report_session, args=(queue,), name=name)
        child.start()
    finally:
        if before is None:
            os.environ.pop(SESSION_NICE_ENV, None)
        else:
            os.environ[SESSION_NICE_ENV] = before
    result = queue.get(timeout=60)
    child.join(timeout=60)
    return result


def test_engine_core_asked_to_starts_a_session_at_the_nice() -> None:
    # Empty for a process still in the boot session's default autogroup (as under a container's PID 1).
    own = Path("/proc/self/autogroup").read_text().split()
    sid, autogroup = _session_of("EngineCore", "7")
    assert sid != os.getsid(0)
    assert autogroup[:1] != own[:1] and autogroup[1:] == ["nice", "7"]
    sid, autogroup = _session_of("EngineCore_DP1", "12")
    assert autogroup[:1] != own[:1] and autogroup[1:] == ["nice", "12"]


@pytest.mark.parametrize(("name", "value"), [("EngineCore", None), ("Worker", "7"), ("EngineCore", "0"),
                                             ("EngineCore", "x"), ("EngineCore", "25")])
def test_other_processes_and_bad_values_keep_the_session(name: str, value: str | None) -> None:
    """Plain vLLM (no switch), vLLM's other processes, and a value that is no nice 1-19 change nothing."""
    sid, autogroup = _session_of(name, value)
    assert sid == os.getsid(0)
    assert autogroup == Path("/proc/self/autogroup").read_text().split()
