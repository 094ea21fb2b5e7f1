"""The engine core's CPU priority against the whole machine, not only against its own session.

Linux's autogroup scheduling (on by default: /proc/sys/kernel/sched_autogroup_enabled) shares the CPUs
between *sessions* first and applies nice values only inside one. An engine replica runs its vLLM processes
at a lower priority (`AppArgs.engine_nice`) so that latency-bound work on the same cores runs first; inside
the service's session that holds, but a program in another session (a benchmark client, another service)
competes with the whole service session at equal weight, and with the engine's threads computing or spinning
on every core it waited up to 1.3 s for a core on the 2-core box (benchmarks/README.md, "The engines'
session"). So the engine core starts a session of its own and gives that session the same nice value.

Loaded by vLLM in each of its processes as a general plugin (entry point `vllm.general_plugins`), it acts only
in an engine-core process whose parent asked for it through `SESSION_NICE_ENV` (`deployments.engine` sets it
while vLLM starts the engine core); everywhere else, plain vLLM included, it does nothing.
"""

from __future__ import annotations

import logging
import multiprocessing
import os

logger = logging.getLogger(__name__)

#: The nice value (1-19) an engine-core process gives its own session; unset: leave the session alone.
SESSION_NICE_ENV = "LTR_ENGINE_SESSION_NICE"
#: How vLLM names the engine-core process it starts (vllm.v1.engine.utils: "EngineCore" or "EngineCore_DP<n>").
ENGINE_CORE_PROCESS_PREFIX = "EngineCore"
AUTOGROUP_SWITCH = "/proc/sys/kernel/sched_autogroup_enabled"


def autogroup_enabled() -> bool:
    try:
        with open(AUTOGROUP_SWITCH) as switch:
            return switch.read().strip() == "1"
    except OSError:   # a kernel without autogroup scheduling
        return False


def engine_core_session() -> None:
    """The vLLM general plugin: in an engine core asked to, start a session at `SESSION_NICE_ENV`'s nice."""
    value = os.environ.get(SESSION_NICE_ENV)
    if not value or not multiprocessing.current_process().name.startswith(ENGINE_CORE_PROCESS_PREFIX):
        return
    if not value.isdigit() or not 1 <= int(value) <= 19:
        logger.warning("%s=%r is not a nice value 1-19; the engine core keeps the service's CPU session",
                       SESSION_NICE_ENV, value)
        return
    if not autogroup_enabled():
        return
    nice = int(value)
    try:
        os.setsid()
    except OSError as error:   # served as before, in the service's session
        logger.warning("engine core keeps the service's CPU session (%s); other programs on these cores may "
                       "wait behind it", error)
        return
    try:
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write(str(nice))
    except OSError as error:
        logger.warning("engine core's own CPU session stays at nice 0 (%s): it competes with the rest of the "
                       "service at equal weight", error)
        return
    logger.info("engine core runs in a CPU session of its own at nice %d", nice)
