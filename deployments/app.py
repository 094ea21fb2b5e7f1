"""Serve application builders (`import_path` targets of the Serve config YAMLs).

Two applications:

- `deployments.app:build_app` — the serving path: `OpenAIIngress` (HTTP) -> `LLMEngine` (vLLM replicas,
  routed by `LeastWorkRouter` or Serve's default power-of-two router);
- `deployments.app:build_predictor_app` — the `Predictor` deployment, its own application so it can be
  scaled, redeployed or deleted without touching the serving path (no score -> FCFS).

Both take a typed, validated `args` mapping (`AppArgs`, `PredictorArgs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from deployments.engine import CPU_ENGINE_ENV, EngineSpec, LLMEngine, ServingOptions
from deployments.ingress import IngressSettings, OpenAIIngress
from deployments.machine import omp_env
from deployments.predictor import Predictor
from deployments.router import LeastWorkRouter
from deployments.streaming import STREAM_BATCH_S
from ltr.scheduling.engine import Platform, platform_policy
from ltr.scheduling.policy import PolicyConfig

ENGINE_DEPLOYMENT = "LLMEngine"
INGRESS_DEPLOYMENT = "OpenAIIngress"
PREDICTOR_DEPLOYMENT = "Predictor"
#: Requests Serve hands one ingress replica at once; its own bound (`max_queued_requests`, 429) is below it.
INGRESS_MAX_ONGOING = 1024


class AppArgs(BaseModel):
    """Arguments of the serving application (the `args:` block of a Serve config)."""

    model_config = ConfigDict(extra="forbid")

    #: HF model folder; "smollm2" means the locally converted SmolLM2-135M-Instruct (prepare_model()).
    model: str = "smollm2"
    served_model_name: str | None = None
    #: Scheduling policy mapping for the engines (`PolicyConfig.from_mapping`), e.g. {"name": "fcfs"}.
    policy: dict[str, Any] = Field(default_factory=lambda: {"name": PolicyConfig().name})
    router: Literal["least_work", "pow2"] = "least_work"
    stats_staleness_s: float = Field(5.0, gt=0)
    routing_stats_period_s: float = Field(1.0, gt=0)
    num_engine_replicas: int = Field(2, ge=1)
    engine_num_cpus: float = Field(0.5, ge=0)
    engine_num_gpus: float = Field(0.0, ge=0)
    #: Extra environment for engine replicas (CPU defaults are added when engine_num_gpus == 0).
    engine_env: dict[str, str] = Field(default_factory=dict)
    #: Nice adjustment (as `nice -n`) of each engine replica's vLLM processes (engine core and workers) against
    #: the replica's own priority: above 0 where the engines share cores with latency-bound work (the predictor,
    #: the ingress), which then runs first. Ray starts its workers at nice 15 unless told otherwise
    #: (`worker_niceness`); the kernel stops at 19.
    engine_nice: int = Field(0, ge=0, le=19)
    #: CPU engines: run the model inside vLLM's engine-core process, as vLLM does on GPU with one worker,
    #: instead of the worker process of its own vLLM-CPU gives it, where the two processes spin on shared
    #: memory while the other works (`deployments.engine.engine_config`). No effect on GPU engines.
    engine_worker_in_core: bool = True
    #: Milliseconds an engine replica gathers a streamed answer's SSE events into one message to the ingress
    #: (`deployments.streaming`); None: the platform's default (`STREAM_BATCH_S`), 0: every event alone.
    stream_batch_ms: float | None = Field(None, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    #: Overrides for `ltr.scheduling.engine.engine_args` (max_num_seqs, max_model_len, dtype, ...).
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    ingress_num_cpus: float = Field(0.1, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    #: Ingress settings other than the model-derived ones (see IngressSettings).
    ingress: dict[str, Any] = Field(default_factory=dict)
    #: Extra environment for ingress replicas (e.g. the variable named by ingress.api_key_env).
    ingress_env: dict[str, str] = Field(default_factory=dict)
    #: vLLM's tool calling (`vllm serve --enable-auto-tool-choice --tool-call-parser NAME`); without a parser,
    #: `tool_choice: "auto"/"required"` is refused as vLLM's server refuses it.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    #: `vllm serve --trust-request-chat-template`: off keeps vLLM's default, a request's chat_template is refused.
    trust_request_chat_template: bool = False
    #: The served-traffic log the engines write (`ltr.data.served_log.ServedLogConfig` fields, e.g.
    #: {directory: /var/log/ltr}); None: nothing is logged. `ingress.log_text` adds the scored text.
    served_log: dict[str, Any] | None = None

    @field_validator("policy")
    @classmethod
    def _valid_policy(cls, value: dict[str, Any]) -> dict[str, Any]:
        PolicyConfig.from_mapping(value)   # ValueError names the key
        return value

    @field_validator("served_log")
    @classmethod
    def _valid_served_log(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from ltr.data.served_log import ServedLogConfig

        ServedLogConfig.from_mapping(value)   # ValueError names the field
        return value

    @model_validator(mode="after")
    def _tool_parser_for_auto_tools(self) -> AppArgs:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser (as vllm serve requires)")
        if self.tool_call_parser is not None:
            from vllm.tool_parsers import ToolParserManager

            known = ToolParserManager.list_registered()
            if self.tool_call_parser not in known:
                raise ValueError(f"unknown tool_call_parser {self.tool_call_parser!r}; vLLM has {sorted(known)}")
        return self

    def model_path(self, prepare: bool = True) -> str:
        """The model folder; "smollm2" is converted on first use (`prepare=False`: only where it goes)."""
        if self.model == "smollm2":
            from ltr.models import SERVED_MODEL_NAME, cache_dir, prepare_model

            return str(prepare_model()) if prepare else str(cache_dir() / "models" / SERVED_MODEL_NAME)
        return self.model

    def served_name(self, model_path: str) -> str:
        """The model name clients send; the folder name ("SmolLM2-135M-Instruct" for the default model)."""
        return self.served_model_name or Path(model_path).name

    def engine_spec(self, model_path: str) -> EngineSpec:
        """What each engine replica is built from; GPU replicas get vLLM's defaults, CPU ones the CPU set."""
        cap = self.ingress.get("max_tokens_cap", IngressSettings.model_fields["max_tokens_cap"].default)
        serving = ServingOptions(served_model_name=self.served_name(model_path), max_tokens_cap=cap,
                                 enable_auto_tool_choice=self.enable_auto_tool_choice,
                                 tool_call_parser=self.tool_call_parser,
                                 trust_request_chat_template=self.trust_request_chat_template)
        platform = self.platform()
        return EngineSpec(model=model_path, policy=self.engine_policy(), platform=platform,
                          serving=serving, overrides=dict(self.engine_kwargs), served_log=self.served_log,
                          nice=self.engine_nice, stream_batch_s=self.stream_batch_s(platform),
                          worker_in_engine_core=platform == "cpu" and self.engine_worker_in_core)

    def platform(self) -> Platform:
        return "gpu" if self.engine_num_gpus > 0 else "cpu"

    def engine_policy(self) -> PolicyConfig:
        """The policy the engines run (the platform's defaults under the configured keys)."""
        return platform_policy(self.policy, self.platform())

    def stream_batch_s(self, platform: Platform) -> float:
        """Seconds the engines gather a stream's events: the configured value, else the platform's default."""
        return STREAM_BATCH_S[platform] if self.stream_batch_ms is None else self.stream_batch_ms / 1000

    def replica_env(self) -> dict[str, str]:
        """Environment of each engine replica: the CPU engine settings under the configured ones on CPU."""
        return dict(self.engine_env) if self.engine_num_gpus > 0 else {**CPU_ENGINE_ENV, **self.engine_env}


class PredictorArgs(BaseModel):
    """Arguments of the predictor application."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    #: Torch threads of each replica (None: Ray's rule, the actor's whole CPUs, at least 1). Scoring comes in
    #: short bursts that requests wait on, so where the engines yield to it (`AppArgs.engine_nice`) it can
    #: take every core for them.
    threads: int | None = Field(None, ge=1)
    #: Calls one replica holds at once (its batches fill from them); more wait in Serve's router for a replica.
    max_ongoing_requests: int = Field(256, ge=1)
    #: PredictorSettings fields (reload_interval_s, fault drill), changeable live as user_config.
    settings: dict[str, Any] = Field(default_factory=dict)

    def actor_options(self) -> dict[str, Any]:
        """Ray actor options of each predictor replica."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.threads is not None:
            options["runtime_env"] = {"env_vars": omp_env(self.threads)}
        return options


def engine_deployment(args: AppArgs, model_path: str) -> Application:
    """The engine deployment bound to its model and policy (exposed for benchmarks and tests)."""
    router_config = RequestRouterConfig(request_routing_stats_period_s=args.routing_stats_period_s,
                                        request_routing_stats_timeout_s=max(args.routing_stats_period_s, 5.0))
    if args.router == "least_work":
        router_config = RequestRouterConfig(
            request_router_class=LeastWorkRouter,
            request_router_kwargs={"stats_staleness_s": args.stats_staleness_s},
            request_routing_stats_period_s=args.routing_stats_period_s,
            request_routing_stats_timeout_s=max(args.routing_stats_period_s, 5.0))
    deployment = serve.deployment(
        LLMEngine, name=ENGINE_DEPLOYMENT, num_replicas=args.num_engine_replicas,
        max_ongoing_requests=args.max_ongoing_requests, request_router_config=router_config,
        health_check_period_s=10, health_check_timeout_s=60, graceful_shutdown_timeout_s=20,
        ray_actor_options={"num_cpus": args.engine_num_cpus, "num_gpus": args.engine_num_gpus,
                           "runtime_env": {"env_vars": args.replica_env()}})
    return deployment.bind(args.engine_spec(model_path))


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The serving application: OpenAI ingress -> routed vLLM engine replicas."""
    parsed = AppArgs(**(args or {}))
    model_path = parsed.model_path()
    settings = IngressSettings(**{"served_model_name": parsed.served_name(model_path),
                                  "served_log": parsed.served_log is not None,
                                  "engine_reranks": parsed.engine_policy().reranks_by_late_scores,
                                  **parsed.ingress})
    actor_options: dict[str, Any] = {"num_cpus": parsed.ingress_num_cpus}
    if parsed.ingress_env:
        actor_options["runtime_env"] = {"env_vars": dict(parsed.ingress_env)}
    ingress = serve.deployment(
        OpenAIIngress, name=INGRESS_DEPLOYMENT, num_replicas=parsed.ingress_replicas,
        max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options=actor_options)
    engine = None if settings.engine_app else engine_deployment(parsed, model_path)
    return ingress.bind(engine, settings.model_dump())


def build_predictor_app(args: dict[str, Any] | None = None) -> Application:
    """The predictor application (no HTTP route); the ingress finds it by name."""
    from deployments.predictor import PredictorSettings

    parsed = PredictorArgs(**(args or {}))
    PredictorSettings(**parsed.settings)  # validate now, not in a replica
    deployment = serve.deployment(
        Predictor, name=PREDICTOR_DEPLOYMENT, num_replicas=parsed.num_replicas,
        max_ongoing_requests=parsed.max_ongoing_requests,
        user_config=parsed.settings, ray_actor_options=parsed.actor_options())
    return deployment.bind()
