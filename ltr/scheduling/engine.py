"""How a caller builds a vLLM engine that schedules by a policy, and how it tags each request.

One place decides the plumbing so the Serve engine deployment, the benchmarks and the tests agree:

- the score of a request travels in ``SamplingParams.extra_args[SCORE_KEY]`` (a float; higher = longer
  predicted output). A missing/NaN/inf score is legal and means "order by arrival".
- the policy travels in ``additional_config={"ltr": {"policy": PolicyConfig.to_mapping(), ...}}`` and
  the adapter (``ltr.scheduling.vllm_scheduler``) is plugged in with ``scheduler_cls``.
- the "fcfs" baseline runs vLLM's own scheduler untouched; the "priority" baseline runs vLLM's own
  scheduler with ``scheduling_policy="priority"`` and the caller passes ``priority=priority_for(...)``
  to ``generate()``. "ltr" (also oracle SJF: feed true lengths as scores) and "mlfq" run the adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ltr.models import SERVED_DTYPE
from ltr.scheduling.policy import PolicyConfig, PriorityPolicy

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs

#: Key of the float score in ``SamplingParams.extra_args``.
SCORE_KEY = "ltr_score"
#: Key of this project's section in vLLM's ``additional_config``.
ADDITIONAL_CONFIG_KEY = "ltr"

SCHEDULER_QUALNAME = "ltr.scheduling.vllm_scheduler.RankScheduler"
ASYNC_SCHEDULER_QUALNAME = "ltr.scheduling.vllm_scheduler.AsyncRankScheduler"

#: Small-machine defaults (2 CPU cores, a few GiB of KV cache); every one can be overridden.
CPU_DEFAULTS: dict[str, Any] = {
    "max_num_seqs": 16,
    "max_model_len": 2048,
    "enable_chunked_prefill": True,
    "enable_prefix_caching": True,
    "async_scheduling": False,
    "dtype": SERVED_DTYPE,
}


def scored_sampling_params(score: float | None, **kwargs: Any) -> SamplingParams:
    """SamplingParams carrying `score` in extra_args (left out when None), other fields from kwargs."""
    from vllm import SamplingParams

    extra = dict(kwargs.pop("extra_args", None) or {})
    if score is not None:
        extra[SCORE_KEY] = float(score)
    return SamplingParams(extra_args=extra or None, **kwargs)


def priority_for(policy: PolicyConfig, score: float | None) -> int:
    """The `priority=` argument for generate(): the quantized score under "priority", else 0."""
    if policy.name == "priority":
        return PriorityPolicy(policy.priority_levels_per_unit).priority_of(score)
    return 0


def additional_config_for(policy: PolicyConfig, stats_path: str | None = None,
                          stats_every: int = 50) -> dict[str, Any]:
    """The ``additional_config`` section the adapter reads (see vllm_scheduler.AdapterConfig)."""
    section: dict[str, Any] = {"policy": policy.to_mapping(), "stats_every": stats_every}
    if stats_path is not None:
        section["stats_path"] = str(stats_path)
    return {ADDITIONAL_CONFIG_KEY: section}


def engine_kwargs(model: str, policy: PolicyConfig, *, stats_path: str | None = None,
                  **overrides: Any) -> dict[str, Any]:
    """Keyword arguments serving `model` under `policy`; valid for `vllm.LLM(**kw)` and `AsyncEngineArgs`.

    `stats_path`: where the adapter dumps its counters as JSON (the engine core may run in another
    process, so a file is the simplest channel); ignored for the fcfs/priority baselines.
    """
    kwargs: dict[str, Any] = {"model": str(model), **CPU_DEFAULTS, **overrides}
    if policy.name == "fcfs":
        kwargs.setdefault("scheduling_policy", "fcfs")
    elif policy.name == "priority":
        kwargs["scheduling_policy"] = "priority"
    else:
        kwargs["scheduling_policy"] = "fcfs"
        kwargs["scheduler_cls"] = (ASYNC_SCHEDULER_QUALNAME if kwargs.get("async_scheduling")
                                   else SCHEDULER_QUALNAME)
        extra = dict(kwargs.get("additional_config") or {})
        extra.update(additional_config_for(policy, stats_path))
        kwargs["additional_config"] = extra
    return kwargs


def engine_args(model: str, policy: PolicyConfig, *, stats_path: str | None = None,
                **overrides: Any) -> AsyncEngineArgs:
    """AsyncEngineArgs (for `AsyncLLM.from_engine_args`) serving `model` under `policy`."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**engine_kwargs(model, policy, stats_path=stats_path, **overrides))
