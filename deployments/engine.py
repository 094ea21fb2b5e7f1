"""Engine deployment: one vLLM `AsyncLLM` per replica, scheduling by the project's policy.

Ranking only helps if requests queue *inside* the engine, where the scheduler can reorder them, so
`max_ongoing_requests` is high (Serve admits up to that many per replica) and the engine's own
`max_num_seqs` bounds the running batch. The score travels in `SamplingParams.extra_args`
(`ltr.scheduling.engine.scored_sampling_params`); a missing score means FCFS order for that request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from deployments.router import STAT_NUM_REQUESTS, STAT_OUTSTANDING_WORK, STAT_TIMESTAMP, ReplicaProbe
from ltr.scheduling.engine import Platform, engine_kwargs, require_tested_vllm, scheduler_class_for
from ltr.scheduling.policy import PolicyConfig

logger = logging.getLogger("ray.serve")

#: Environment every CPU engine replica needs on a shared small machine (see README).
CPU_ENGINE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclass(frozen=True)
class EngineSpec:
    """What every replica of an engine deployment is built from: typed and validated in `app.py`, before
    it crosses into Serve, and the one source of the keyword arguments each replica passes to vLLM."""

    model: str
    policy: PolicyConfig
    platform: Platform
    #: `engine_kwargs` overrides from the config (vLLM `AsyncEngineArgs` fields).
    overrides: dict[str, Any] = field(default_factory=dict)

    def vllm_kwargs(self, stats_path: str | None = None, score_updates_path: str | None = None) -> dict[str, Any]:
        """The exact `AsyncEngineArgs` keyword arguments of a replica whose scheduler dumps its counters to
        `stats_path` and reads late scores from `score_updates_path`."""
        overrides = {"disable_log_stats": True, **self.overrides}
        return engine_kwargs(self.model, self.policy, platform=self.platform, stats_path=stats_path,
                             score_updates_path=score_updates_path, **overrides)

    def scheduler_class(self) -> str:
        """The scheduler class vLLM will run, from its resolved async-scheduling setting."""
        return scheduler_class_for(self.policy, self.vllm_kwargs(), self.platform)

    def max_model_len(self) -> int | None:
        """The configured context length (None: vLLM derives it from the model at start)."""
        value = self.vllm_kwargs().get("max_model_len")
        return None if value is None else int(value)


@dataclass
class EngineRequest:
    """One generation request as the ingress hands it to an engine replica (and the router reads it)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    score: float | None = None
    #: Predicted cost in decode-token units (`ltr.routing.request_work`); read by `LeastWorkRouter`.
    predicted_work: float = 0.0
    #: The predictor's pending answer (a Ray ObjectRef of a `Prediction`) when the ingress stopped waiting
    #: for it: the replica re-ranks the request when it lands.
    late_prediction: Any = None


@dataclass
class EngineChunk:
    """A streamed delta: new text, cumulative token counts, and where it ran."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None
    replica: str


@dataclass
class _Tracked:
    predicted_work: float
    generated: int = 0
    scored: bool = False
    started: float = field(default_factory=time.time)


def _latest_stats_logger(sink: dict[str, Any]) -> type:
    """A vLLM stat logger that keeps only the latest scheduler stats in `sink`.

    The engine core lives in its own process; this is how the replica sees whether requests are
    still running/waiting there and how much KV cache they hold (reliability checks read it after
    client disconnects). Passing it makes vLLM collect stats without its default log lines.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LatestSchedulerStats(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                sink.update(running=scheduler_stats.num_running_reqs, waiting=scheduler_stats.num_waiting_reqs,
                            kv_cache_usage=scheduler_stats.kv_cache_usage, timestamp=time.time())

        def log_engine_initialized(self) -> None:
            pass

    return LatestSchedulerStats


class LLMEngine:
    """The engine deployment's class; `app.py` wraps it with `serve.deployment` options."""

    def __init__(self, spec: EngineSpec) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if not isinstance(spec, EngineSpec):
            raise TypeError(f"LLMEngine takes an EngineSpec (deployments.app builds it), got {type(spec).__name__}")
        self.policy = spec.policy
        require_tested_vllm(self.policy)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (benchmarks calling it directly)
            self.replica = f"local-{uuid.uuid4().hex[:8]}"
        self._stats_dir = Path(tempfile.mkdtemp(prefix=f"ltr-engine-{self.replica}-"))
        self.stats_path = self._stats_dir / "scheduler_stats.json"
        #: Late scores go to the rank scheduler through this file (`ltr.scheduling.score_updates`).
        self.score_updates_path = self._stats_dir / "score_updates.tsv"
        args = AsyncEngineArgs(**spec.vllm_kwargs(str(self.stats_path), str(self.score_updates_path)))
        #: The engine core's latest SchedulerStats (running/waiting/KV use), for `debug_stats`.
        self.core_stats: dict[str, Any] = {}
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[_latest_stats_logger(self.core_stats)])
        self.max_model_len = self.llm.vllm_config.model_config.max_model_len
        self._tracked: dict[str, _Tracked] = {}
        self.counters = {"requests": 0, "scored": 0, "unscored": 0, "aborted": 0, "failed": 0, "late_scores": 0}
        logger.info("engine replica %s ready: model=%s policy=%s async_scheduling=%s", self.replica, spec.model,
                    self.policy.name, self.llm.vllm_config.scheduler_config.async_scheduling)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Stream deltas for one request; cancellation (client gone) aborts it in the engine."""
        from vllm.sampling_params import RequestOutputKind

        from ltr.scheduling.engine import priority_for, scored_sampling_params

        awaits_score = request.late_prediction is not None and self.policy.runs_rank_scheduler
        params = scored_sampling_params(request.score, output_kind=RequestOutputKind.DELTA,
                                        late_score_id=request.request_id if awaits_score else None,
                                        **request.sampling)
        tracked = _Tracked(request.predicted_work, scored=request.score is not None)
        self._tracked[request.request_id] = tracked
        self.counters["requests"] += 1
        self.counters["scored" if tracked.scored else "unscored"] += 1
        prompt_tokens = len(request.prompt_token_ids)
        finished = False
        late = None
        if awaits_score:
            late = asyncio.get_running_loop().create_task(
                self._apply_late_prediction(request.request_id, request.late_prediction, tracked, prompt_tokens))
        try:
            async for output in self.llm.generate(
                    {"prompt_token_ids": request.prompt_token_ids}, params, request.request_id,
                    priority=priority_for(self.policy, request.score)):
                completion = output.outputs[0]
                tracked.generated += len(completion.token_ids)
                finished = output.finished
                yield EngineChunk(text=completion.text, completion_tokens=tracked.generated,
                                  prompt_tokens=prompt_tokens,
                                  finish_reason=completion.finish_reason if output.finished else None,
                                  replica=self.replica)
        except (asyncio.CancelledError, GeneratorExit):
            self.counters["aborted"] += 1
            raise
        except Exception:
            self.counters["failed"] += 1
            raise
        finally:
            if late is not None:
                late.cancel()
            self._tracked.pop(request.request_id, None)
            if not finished:
                # AsyncLLM aborts on cancellation itself; aborting again is idempotent and also
                # covers a generator closed without cancellation.
                await self.llm.abort(request.request_id)

    async def _apply_late_prediction(self, request_id: str, pending: Any, tracked: _Tracked,
                                     prompt_tokens: int) -> None:
        """When the predictor's late answer lands, hand its score to the scheduler (which re-ranks the
        request where it stands) and its expected length to the router's load report."""
        from ltr.routing import request_work
        from ltr.scheduling.score_updates import append_score_update

        try:
            prediction = await pending
        except Exception as exc:   # the predictor failed after all: the request keeps its neutral place
            logger.debug("late prediction for %s failed: %s", request_id, exc)
            return
        if request_id not in self._tracked:
            return
        append_score_update(self.score_updates_path, request_id, prediction.score)
        tracked.predicted_work = request_work(prediction.expected_tokens, prompt_tokens)
        self.counters["late_scores"] += 1

    def outstanding_work(self) -> float:
        """Predicted decode tokens still to come for the requests this replica holds."""
        return float(sum(max(t.predicted_work - t.generated, 1.0) for t in self._tracked.values()))

    def record_routing_stats(self) -> dict[str, Any]:
        """Load report for `LeastWorkRouter` (Serve calls this every request_routing_stats_period_s)."""
        return {STAT_OUTSTANDING_WORK: self.outstanding_work(), STAT_NUM_REQUESTS: len(self._tracked),
                STAT_TIMESTAMP: time.time()}

    def scheduler_stats(self) -> dict[str, Any]:
        """Counters the rank scheduler in the engine-core process dumps to its stats file."""
        try:
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def debug_stats(self, probe: ReplicaProbe | None = None) -> dict[str, Any]:
        """What this replica saw: request counters, current load, and the scheduler's own counters.

        `probe` is only read by `LeastWorkRouter`, to steer the call to a replica not yet visited.
        """
        return {"replica": self.replica, "policy": self.policy.name, "counters": dict(self.counters),
                "in_flight": len(self._tracked), "outstanding_work": self.outstanding_work(),
                "scheduler": self.scheduler_stats(), "engine_core": dict(self.core_stats),
                "max_model_len": self.max_model_len}

    async def check_health(self) -> None:
        """Serve's health check: fails (and Serve replaces the replica) when the engine core died."""
        await self.llm.check_health()

    def __del__(self) -> None:
        """Shut the engine core process down when Serve stops the replica."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()
            self.llm = None
        stats_dir = getattr(self, "_stats_dir", None)
        if stats_dir is not None and stats_dir.exists():
            for child in stats_dir.iterdir():
                child.unlink(missing_ok=True)
            os.rmdir(stats_dir)
