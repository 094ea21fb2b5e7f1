"""Engine deployment: one vLLM `AsyncLLM` per replica, scheduling by the project's policy, served through
vLLM's own OpenAI serving layer (`OpenAIServingChat`, `OpenAIServingCompletion`, `OpenAIServingModels`,
built by vLLM's `init_app_state` on the replica's AsyncLLM), so every field vLLM's server honors is honored
here and fails the same way.

Ranking only helps if requests queue *inside* the engine, where the scheduler can reorder them, so
`max_ongoing_requests` is high (Serve admits up to that many per replica) and the engine's own
`max_num_seqs` bounds the running batch. The score travels in the request's `vllm_xargs`, which vLLM puts
into `SamplingParams.extra_args` (`ltr.scheduling.engine.SCORE_KEY`); no score means FCFS order.
vLLM's Prometheus metrics live in this process's default registry (`vllm_metrics`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ray import serve

from deployments.router import (STAT_NUM_REQUESTS, STAT_OUTSTANDING_WORK, STAT_REMAINING_BY_REQUEST,
                                STAT_TIMESTAMP)
from deployments.streaming import batched_events
from ltr.scheduling.engine import Platform, engine_kwargs, require_tested_vllm, scheduler_class_for
from ltr.scheduling.policy import PolicyConfig

logger = logging.getLogger("ray.serve")

#: Environment every CPU engine replica needs on a shared small machine (see README).
CPU_ENGINE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclass(frozen=True)
class ServingOptions:
    """The OpenAI serving layer's options, the same flags `vllm serve` takes (validated in `app.py`)."""

    served_model_name: str
    #: Server-wide output cap: vLLM's `override_generation_config.max_new_tokens` (None: vLLM's own limits).
    max_tokens_cap: int | None = None
    #: `--enable-auto-tool-choice` / `--tool-call-parser`: tool calls parsed from the model's output.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    #: `--trust-request-chat-template`: off, so a request-supplied chat template is refused (vLLM's default).
    trust_request_chat_template: bool = False

    def cli_args(self, model: str) -> list[str]:
        """The `vllm serve` command line these options are (parsed by vLLM's own argument parser)."""
        args = ["--model", model, "--served-model-name", self.served_model_name]
        if self.enable_auto_tool_choice:
            args.append("--enable-auto-tool-choice")
        if self.tool_call_parser is not None:
            args += ["--tool-call-parser", self.tool_call_parser]
        if self.trust_request_chat_template:
            args.append("--trust-request-chat-template")
        return args


@dataclass(frozen=True)
class EngineSpec:
    """What every replica of an engine deployment is built from: typed and validated in `app.py`, before
    it crosses into Serve, and the one source of the keyword arguments each replica passes to vLLM."""

    model: str
    policy: PolicyConfig
    platform: Platform
    serving: ServingOptions
    #: `engine_kwargs` overrides from the config (vLLM `AsyncEngineArgs` fields).
    overrides: dict[str, Any] = field(default_factory=dict)
    #: The served-traffic log's settings (`ltr.data.served_log.ServedLogConfig` fields); None: off.
    served_log: dict[str, Any] | None = None
    #: Nice adjustment of the engine core and worker processes vLLM starts (`AppArgs.engine_nice`).
    nice: int = 0
    #: Seconds a streamed answer's events are gathered into one message to the ingress
    #: (`deployments.streaming`); 0 sends each event alone.
    stream_batch_s: float = 0.0
    #: Run the model inside vLLM's engine-core process (vLLM's "uni" executor) instead of a worker process of
    #: its own (`AppArgs.engine_worker_in_core`; only CPU engines with one worker are affected).
    worker_in_engine_core: bool = False

    def vllm_kwargs(self, stats_path: str | None = None, score_updates_path: str | None = None,
                    writer_id: str = "") -> dict[str, Any]:
        """The exact `AsyncEngineArgs` keyword arguments of a replica whose scheduler dumps its counters to
        `stats_path`, reads late scores from `score_updates_path` and names its log segments `writer_id`."""
        overrides = {"served_model_name": self.serving.served_model_name, **self.overrides}
        if self.serving.max_tokens_cap is not None:
            generation = dict(overrides.get("override_generation_config") or {})
            generation.setdefault("max_new_tokens", self.serving.max_tokens_cap)
            overrides["override_generation_config"] = generation
        served_log = None if self.served_log is None else {**self.served_log, "writer_id": writer_id}
        return engine_kwargs(self.model, self.policy, platform=self.platform, stats_path=stats_path,
                             score_updates_path=score_updates_path, served_log=served_log, **overrides)

    def scheduler_class(self) -> str:
        """The scheduler class vLLM will run, from its resolved async-scheduling setting."""
        return scheduler_class_for(self.policy, self.vllm_kwargs(), self.platform)

    def max_model_len(self) -> int | None:
        """The configured context length (None: vLLM derives it from the model at start)."""
        value = self.vllm_kwargs().get("max_model_len")
        return None if value is None else int(value)


@dataclass
class EngineRequest:
    """One OpenAI request as the ingress hands it to an engine replica (and the router reads it)."""

    kind: Literal["chat", "completion"]
    #: The client's JSON body, already validated by the ingress with vLLM's protocol model.
    body: dict[str, Any]
    #: Our id of the request: late scores address it (`extra_args["ltr_late_score_id"]`).
    request_id: str
    score: float | None = None
    expected_tokens: float | None = None
    #: Predicted cost in decode-token units (`ltr.routing.request_work`); read by `LeastWorkRouter`.
    predicted_work: float = 0.0
    #: The predictor's pending answer (a Ray ObjectRef of a `Prediction`) when the ingress did not wait for
    #: it: the replica re-ranks the request when it lands.
    late_prediction: Any = None
    #: Sent ahead of its score (`late_prediction`): the rank scheduler holds the request behind all other
    #: work until the score lands, or `release_after_s` after it reached the replica (then the request keeps
    #: the neutral `score` it came with, and its own still re-ranks it if it lands later).
    score_pending: bool = False
    release_after_s: float = 0.0
    #: What the request's record (live ranking quality, the served-traffic log) holds besides the engine's own
    #: counts: the predictor version, and with the log on input hash and length and opt-in text
    #: (`ltr.data.served_log.record_extra_args`).
    log_fields: dict[str, Any] = field(default_factory=dict)
    #: With the served-traffic log on, whether it records the predictor's input text (None: log off); a
    #: late answer's own fields are sent to the scheduler with its score.
    log_text: bool | None = None


@dataclass(frozen=True)
class ReplyHead:
    """First item of every reply stream: vLLM's status and, for a non-streamed answer, its JSON body.
    A streamed answer's SSE strings follow it unchanged."""

    status: int
    replica: str
    body: dict[str, Any] | None = None


@dataclass
class _Tracked:
    predicted_work: float
    expected_tokens: float | None
    prompt_tokens: int = 0
    generated: int = 0
    scored: bool = False
    started: float = field(default_factory=time.time)


#: The request this task serves (read by `_TrackingEngineClient`). Serve runs each call in its own task, and a
#: task has its own copy of the context, so concurrent requests never see each other's.
_CURRENT: ContextVar[_Tracked | None] = ContextVar("ltr_current_request", default=None)


class _TrackingEngineClient:
    """The replica's AsyncLLM as vLLM's serving layer sees it, with `generate` observed: the router's load
    report needs each request's real prompt length and the tokens generated so far, and a request closed
    without finishing is aborted (AsyncLLM does on cancellation; this also covers a plain close)."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any,
                       **kwargs: Any) -> AsyncIterator[Any]:
        from vllm.sampling_params import RequestOutputKind

        from ltr.routing import request_work

        tracked = _CURRENT.get()
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        finished = False
        try:
            async for output in self._llm.generate(prompt, sampling_params, request_id, *args, **kwargs):
                if tracked is not None:
                    if not tracked.prompt_tokens and output.prompt_token_ids is not None:
                        tracked.prompt_tokens = len(output.prompt_token_ids)
                        tracked.predicted_work = request_work(tracked.expected_tokens, tracked.prompt_tokens)
                    new = max((len(o.token_ids) for o in output.outputs), default=0)
                    tracked.generated = tracked.generated + new if delta else max(tracked.generated, new)
                finished = output.finished
                yield output
        finally:
            if not finished:
                await self._llm.abort(request_id)


def engine_config(args: Any, worker_in_engine_core: bool) -> Any:
    """vLLM's config for `args`; with `worker_in_engine_core`, one whose single model worker runs inside the
    engine-core process, as vLLM runs one worker on GPU.

    vLLM-CPU moves that worker into a process of its own whenever V1 multiprocessing is on (its platform's
    `check_and_update_config`); the engine core then waits for every model step on shared memory, spinning
    (`shm_broadcast.SpinCondition`), and the worker spins between steps. Offline on the 2-core box
    (benchmarks/results/engine_placement_1x1.json) a one-thread engine burned 1.99 cores for 489-491 tok/s,
    against 1.02-1.03 for 496-499 with the model inside. The platform reads the switch only while the config is
    built, so it is off for that moment alone; AsyncLLM still starts the engine core in its own process."""
    from vllm.usage.usage_lib import UsageContext

    if not worker_in_engine_core:
        return args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    before = os.environ.get(_MULTIPROCESSING_SWITCH)
    os.environ[_MULTIPROCESSING_SWITCH] = "0"
    try:
        return args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    finally:
        if before is None:
            del os.environ[_MULTIPROCESSING_SWITCH]
        else:
            os.environ[_MULTIPROCESSING_SWITCH] = before


#: The environment switch vLLM-CPU's platform reads to decide where a lone model worker runs.
_MULTIPROCESSING_SWITCH = "VLLM_ENABLE_V1_MULTIPROCESSING"


@contextmanager
def _nice(adjustment: int) -> Iterator[None]:
    """Run the body `adjustment` nice levels lower in priority (as `nice -n`). Linux keeps a nice value per
    thread and a process started from a thread inherits that thread's, so vLLM's engine core and workers
    started in the body keep the lower priority while the replica's own threads go back to theirs. The engine
    core also takes a CPU session of its own at that nice (`ltr.scheduling.engine_session`): across sessions
    Linux weighs sessions, not nice values."""
    if not adjustment:
        yield
        return
    from ltr.scheduling.engine_session import SESSION_NICE_ENV

    before = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, min(19, before + adjustment))
    os.environ[SESSION_NICE_ENV] = str(min(19, adjustment))
    try:
        yield
    finally:
        os.environ.pop(SESSION_NICE_ENV, None)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, before)
        except PermissionError:   # no CAP_SYS_NICE: this thread cannot raise its priority again
            logger.warning("engine replica thread stays at the engines' lower priority (needs CAP_SYS_NICE)")


def _latest_stats_logger(sink: dict[str, Any]) -> type:
    """A vLLM stat logger that keeps only the latest scheduler stats in `sink`.

    The engine core lives in its own process; this is how the replica sees whether requests are
    still running/waiting there and how much KV cache they hold (reliability checks read it after
    client disconnects). vLLM's own Prometheus logger runs beside it (log stats are on, as in `vllm serve`).
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

    async def __init__(self, spec: EngineSpec) -> None:
        """Async because vLLM builds its serving layer (`init_app_state`) in the event loop."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if not isinstance(spec, EngineSpec):
            raise TypeError(f"LLMEngine takes an EngineSpec (deployments.app builds it), got {type(spec).__name__}")
        self.policy = spec.policy
        self.stream_batch_s = spec.stream_batch_s
        require_tested_vllm(self.policy)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (benchmarks calling it directly)
            self.replica = f"local-{uuid.uuid4().hex[:8]}"
        self._stats_dir = Path(tempfile.mkdtemp(prefix=f"ltr-engine-{self.replica}-"))
        self.stats_path = self._stats_dir / "scheduler_stats.json"
        #: Late scores go to the rank scheduler through this file (`ltr.scheduling.score_updates`).
        self.score_updates_path = self._stats_dir / "score_updates.tsv"
        args = AsyncEngineArgs(**spec.vllm_kwargs(str(self.stats_path), str(self.score_updates_path),
                                                  writer_id=self.replica))
        #: The engine core's latest SchedulerStats (running/waiting/KV use), for `debug_stats`.
        self.core_stats: dict[str, Any] = {}
        config = engine_config(args, spec.worker_in_engine_core)
        with _nice(spec.nice):   # the processes vLLM starts now inherit it; this replica keeps its own
            self.llm = AsyncLLM.from_vllm_config(config, stat_loggers=[_latest_stats_logger(self.core_stats)],
                                                 enable_log_requests=args.enable_log_requests,
                                                 disable_log_stats=args.disable_log_stats)
        self.max_model_len = self.llm.vllm_config.model_config.max_model_len
        self.state = await _serving_state(_TrackingEngineClient(self.llm), spec)
        self._tracked: dict[str, _Tracked] = {}
        self.counters = {"requests": 0, "scored": 0, "unscored": 0, "aborted": 0, "failed": 0, "followed_scores": 0,
                         "late_scores": 0, "finished_before_score": 0, "released_unscored": 0}
        logger.info("engine replica %s ready: model=%s policy=%s async_scheduling=%s", self.replica, spec.model,
                    self.policy.name, self.llm.vllm_config.scheduler_config.async_scheduling)

    async def openai(self, request: EngineRequest) -> AsyncIterator[ReplyHead | str]:
        """Serve one OpenAI request with vLLM's own serving layer: a `ReplyHead`, then (streams) vLLM's SSE
        strings. The score rides in `vllm_xargs`; cancellation (client gone) aborts it in the engine."""
        from ltr.scheduling.engine import LATE_SCORE_ID_KEY, SCORE_KEY, SCORE_PENDING_KEY, priority_for

        awaits_score = request.late_prediction is not None and self.policy.runs_rank_scheduler
        body = dict(request.body)
        # The scheduler's keys come from the ingress only: a client cannot rank itself through vllm_xargs.
        # Every `ltr_` key is ours (score, late-score id, what the served-traffic log records).
        xargs = {k: v for k, v in (body.get("vllm_xargs") or {}).items() if not str(k).startswith("ltr_")}
        xargs.update(request.log_fields)
        if request.score is not None:
            xargs[SCORE_KEY] = float(request.score)
        if awaits_score:
            xargs[LATE_SCORE_ID_KEY] = request.request_id
            if request.score_pending:
                xargs[SCORE_PENDING_KEY] = True
        body["vllm_xargs"] = xargs or None
        if self.policy.name == "priority":
            body["priority"] = priority_for(self.policy, request.score)
        tracked = _Tracked(request.predicted_work, request.expected_tokens, scored=request.score is not None)
        self._tracked[request.request_id] = tracked
        self.counters["requests"] += 1
        self.counters["scored" if tracked.scored else "unscored"] += 1
        late = None
        if awaits_score:
            late = asyncio.get_running_loop().create_task(self._apply_late_prediction(request, tracked))
        _CURRENT.set(tracked)
        try:
            result = await self._call_serving(request.kind, body)
            if isinstance(result, ReplyHead):
                if result.status >= 500:
                    self.counters["failed"] += 1
                yield result
                return
            yield ReplyHead(200, self.replica)
            async for message in batched_events(result, self.stream_batch_s):
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            self.counters["aborted"] += 1
            raise
        except Exception:
            self.counters["failed"] += 1
            raise
        finally:
            if late is not None:
                if not late.done():   # its answer reached this replica after the request was done, if at all
                    self.counters["finished_before_score"] += 1
                late.cancel()
            self._tracked.pop(request.request_id, None)

    async def _call_serving(self, kind: str, body: dict[str, Any]) -> ReplyHead | AsyncIterator[str]:
        """vLLM's handler for `kind`, answered as vLLM's server answers it: an error (returned or raised)
        as its ErrorResponse and status, a full response as its JSON, a stream as its SSE generator."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        try:
            if kind == "chat":
                result = await self.state.openai_serving_chat.create_chat_completion(
                    ChatCompletionRequest.model_validate(body), None)
            else:
                result = await self.state.openai_serving_completion.create_completion(
                    CompletionRequest.model_validate(body), None)
        except Exception as exc:  # what vLLM's exception handlers turn into an error response
            result = create_error_response(exc)
        if isinstance(result, ErrorResponse):
            return ReplyHead(int(result.error.code), self.replica, result.model_dump())
        if hasattr(result, "__aiter__"):
            return result
        return ReplyHead(200, self.replica, result.model_dump())

    async def models(self) -> dict[str, Any]:
        """`GET /v1/models` as vLLM answers it."""
        return (await self.state.openai_serving_models.show_available_models()).model_dump()

    async def vllm_metrics(self) -> dict[str, str]:
        """vLLM's own Prometheus metrics, which its stat logger keeps in this process's default registry
        (text format), and this replica's id (the ingress broadcasts this call to every replica)."""
        from deployments.metrics import vllm_registry_text

        return {"replica": self.replica, "text": vllm_registry_text()}

    async def _apply_late_prediction(self, request: EngineRequest, tracked: _Tracked) -> None:
        """When the predictor's answer lands, hand its score (with its version and, with the served-traffic
        log on, what the log records of it) to the scheduler, which re-ranks the request where it stands, and
        its expected length to the router's load report. A request sent ahead of its score is released to its
        neutral score when the answer fails, or has not landed `release_after_s` from now (it may still land
        and re-rank it)."""
        from ltr.data.served_log import record_extra_args
        from ltr.routing import request_work
        from ltr.scheduling.score_updates import ScoreUpdate, append_score_update

        request_id = request.request_id
        answer = asyncio.ensure_future(request.late_prediction)
        pending = request.score_pending
        try:
            if pending:
                done, _ = await asyncio.wait({answer}, timeout=request.release_after_s)
                if not done:
                    append_score_update(self.score_updates_path, ScoreUpdate(request_id, None, final=False))
                    self.counters["released_unscored"] += 1
                    pending = False
            prediction = await answer
        except asyncio.CancelledError:
            answer.cancel()
            raise
        except Exception as exc:   # the predictor failed after all: the request keeps its neutral place
            logger.debug("late prediction for %s failed: %s", request_id, exc)
            if pending:
                append_score_update(self.score_updates_path, ScoreUpdate(request_id, None))
                self.counters["released_unscored"] += 1
            return
        extra = ({} if prediction.input_text is None
                 else record_extra_args(prediction.input_text, prediction.version, request.log_text))
        append_score_update(self.score_updates_path, ScoreUpdate(request_id, prediction.score, extra))
        tracked.expected_tokens = prediction.expected_tokens
        tracked.predicted_work = request_work(prediction.expected_tokens, tracked.prompt_tokens)
        self.counters["followed_scores" if pending else "late_scores"] += 1

    def remaining_work(self) -> dict[str, float]:
        """Predicted decode tokens still to come, per request this replica holds (by `EngineRequest.request_id`)."""
        return {rid: max(t.predicted_work - t.generated, 1.0) for rid, t in self._tracked.items()}

    def outstanding_work(self) -> float:
        """Predicted decode tokens still to come for the requests this replica holds."""
        return float(sum(self.remaining_work().values()))

    async def record_routing_stats(self) -> dict[str, Any]:
        """Load report for `LeastWorkRouter` (Serve calls this every request_routing_stats_period_s).

        This and the debug calls are coroutines, on the replica's event loop: as sync methods (which Serve
        runs in a thread pool) they were seen not answering within 10 s once vLLM's serving layer ran here."""
        remaining = self.remaining_work()
        return {STAT_OUTSTANDING_WORK: float(sum(remaining.values())), STAT_NUM_REQUESTS: len(remaining),
                STAT_REMAINING_BY_REQUEST: remaining, STAT_TIMESTAMP: time.time()}

    def scheduler_stats(self) -> dict[str, Any]:
        """Counters the rank scheduler in the engine-core process dumps to its stats file."""
        try:
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    async def debug_stats(self) -> dict[str, Any]:
        """What this replica saw: request counters, current load, and the scheduler's own counters."""
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


async def _serving_state(engine_client: Any, spec: EngineSpec) -> Any:
    """vLLM's OpenAI serving layer on `engine_client`, built exactly as `vllm serve` builds it
    (`init_app_state` on the arguments its own parser makes of `spec.serving`)."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(spec.serving.cli_args(spec.model))
    validate_parsed_serve_args(args)
    state = State()
    await init_app_state(engine_client, state, args, supported_tasks=await engine_client.get_supported_tasks())
    return state
