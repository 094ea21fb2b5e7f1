"""OpenAI-compatible HTTP ingress: validate, template, score, route, stream.

Every failure a client can cause is answered with an OpenAI-style error object and a 4xx status
(`{"error": {"message", "type", "param", "code"}}`), including FastAPI's own validation errors (400,
not 422). The predictor is consulted with a timeout and a circuit breaker; when it is absent, slow or
failing the request proceeds without a score, which the engine serves in arrival order.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.engine import EngineChunk, EngineRequest
from deployments.metrics import prometheus_text
from deployments.neutral import NeutralPlacement, calibration_median
from deployments.predictor import Prediction, PredictorUnavailable
from deployments.router import ReplicaProbe
from ltr.routing import request_work

logger = logging.getLogger("ray.serve")

SCORE_HEADER = "x-ltr-score"
REPLICA_HEADER = "x-ltr-replica"
FALLBACK_HEADER = "x-ltr-fallback"
PLACEMENT_HEADER = "x-ltr-placement"
SCORE_OVERRIDE_HEADER = "x-ltr-score-override"
EXPECTED_OVERRIDE_HEADER = "x-ltr-expected-tokens-override"
#: `/v1/ltr/engine_stats` sweep: stop after this many already-seen replicas in a row, or this many calls.
ENGINE_STATS_REPEATS = 3
ENGINE_STATS_MAX_CALLS = 256


# ---- settings --------------------------------------------------------------------------------------

class IngressSettings(BaseModel):
    """Validated once when the app is built; see `deployments/serve_config_*.yaml` for examples."""

    model_config = ConfigDict(extra="forbid")

    served_model_name: str
    #: Folder with the served model's tokenizer (and chat template); fixed by config, never by a request.
    tokenizer_path: str
    #: The engines' context length (`EngineSpec.max_model_len`, filled in by `app.build_app`).
    max_model_len: int = Field(ge=16)
    max_tokens_cap: int = Field(1024, ge=1)
    default_completion_max_tokens: int = Field(16, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    #: Name of the environment variable holding the API key; unset/empty variable = no auth.
    api_key_env: str | None = None
    #: Serve application holding the `Predictor` deployment; None disables scoring (pure FCFS).
    predictor_app: str | None = "ltr-predictor"
    predictor_deployment: str = "Predictor"
    predictor_timeout_s: float = Field(0.5, gt=0)
    #: A request the predictor did not score (timeout, error, open breaker): "neutral" gives it the median of
    #: recent predictions (deployments/neutral.py), "first" leaves it unscored, i.e. ahead of ranked work.
    unscored_placement: Literal["neutral", "first"] = "neutral"
    #: How many recent predictions the neutral score is the median of.
    neutral_window: int = Field(512, ge=1)
    #: A request sent on after a predictor timeout is re-ranked in its engine when the score lands.
    late_scores: bool = True
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_s: float = Field(5.0, gt=0)
    #: Trust a client-supplied score header (oracle experiments, scheduler tests); off in production.
    allow_score_override: bool = False
    #: Use the engine deployment of another Serve application instead of a bound one (extra ingresses).
    engine_app: str | None = None


# ---- OpenAI request schemas ------------------------------------------------------------------------

class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: bool = False


class _SamplingFields(_Base):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    #: Bounded to int64: larger seeds overflow the engine's request encoding (500).
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = 1
    #: vLLM extension (benchmarks use it to produce exact lengths).
    ignore_eos: bool = False
    logprobs: Any = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        if value == "" or (isinstance(value, list) and "" in value):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return value

    def sampling(self, max_tokens: int) -> dict[str, Any]:
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": self.stop, "seed": self.seed, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "ignore_eos": self.ignore_eos}


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request is supported")
            value = value[0]
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value


class TextPart(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _has_user_turn(self) -> ChatRequest:
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise ValueError("messages must contain a non-empty user message")
        return self


# ---- errors ----------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                        for e in exc.errors()[:5])
    return APIError(400, message or "invalid request", param=".".join(loc) or None, code="invalid_value")


def _openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a route that parses its body itself (size cap first, then the model).

    The routes read the raw body so oversized requests are refused before parsing; declaring the
    schema here keeps /openapi.json complete for clients and schema-driven fuzzing. `$defs` are
    inlined because OpenAPI resolves `$ref` against the whole document, not the schema.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


api = FastAPI(title="ltr-serve", description="OpenAI-compatible LLM serving ranked by predicted output length")


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@api.exception_handler(RequestValidationError)
async def _request_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _validation_error(exc).response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, str(exc.detail), type_, code=code).response()


@api.exception_handler(Exception)
async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    """A bug still answers an OpenAI error object (500), not a bare text page."""
    if "Cancelled" not in type(exc).__name__:  # a client that hung up mid-response is not an error
        logger.exception("unhandled error in the ingress")
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error").response()


# ---- the deployment --------------------------------------------------------------------------------

@serve.ingress(api)
class OpenAIIngress:
    """FastAPI ingress; `app.py` wraps it with `serve.deployment` options and binds the engine."""

    def __init__(self, engine: DeploymentHandle | None, settings: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        self.settings = IngressSettings(**settings)
        if engine is None:
            if not self.settings.engine_app:
                raise ValueError("no engine bound and no engine_app configured")
            engine = serve.get_deployment_handle("LLMEngine", app_name=self.settings.engine_app)
        self.engine = engine
        self.tokenizer = AutoTokenizer.from_pretrained(self.settings.tokenizer_path)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.settings.tokenizer_path} has no chat template")
        self._api_key = os.environ.get(self.settings.api_key_env or "", "") or None
        self._predictor: DeploymentHandle | None = None
        if self.settings.predictor_app:
            self._predictor = serve.get_deployment_handle(
                self.settings.predictor_deployment, app_name=self.settings.predictor_app, _check_exists=False)
        self._failures = 0
        self._breaker_open_until = 0.0
        self.fallbacks: Counter[str] = Counter()
        self._neutral = NeutralPlacement(self.settings.neutral_window, calibration_median())
        self.neutral_placements = 0
        self.replicas_seen: Counter[str] = Counter()
        self.requests = Counter()
        from ray.util.metrics import Counter as MetricCounter

        self._fallback_metric = MetricCounter(
            "ltr_predictor_fallbacks",
            description="Requests the predictor did not score, by reason (placed at the neutral score unless "
                        "unscored_placement is 'first', or no predictor is configured).",
            tag_keys=("reason",))

    # -- helpers -------------------------------------------------------------------------------------

    def _check_auth(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key.encode()):
            raise APIError(401, "invalid or missing API key (use 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    async def _read_json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            raise APIError(413, f"request body exceeds {self.settings.max_body_bytes} bytes", code="body_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > self.settings.max_body_bytes:
                raise APIError(413, f"request body exceeds {self.settings.max_body_bytes} bytes",
                               code="body_too_large")
        try:
            data = json.loads(bytes(body))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise APIError(400, f"request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
        try:  # "\ud800" is valid JSON but not text: the tokenizer would fail on it (500)
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "request body contains invalid Unicode (a lone surrogate escape)",
                           code="invalid_json") from None
        return data

    def _parse(self, model: type[BaseModel], data: Any) -> Any:
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            parsed = model.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        if parsed.model != self.settings.served_model_name:
            raise APIError(404, f"model {parsed.model!r} does not exist; this server serves "
                           f"{self.settings.served_model_name!r}", param="model", code="model_not_found")
        return parsed

    def _max_tokens(self, requested: int | None, prompt_len: int, default: int | None) -> int:
        limit = self.settings.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"prompt has {prompt_len} tokens; this model's context is {limit} tokens",
                           param="prompt", code="context_length_exceeded")
        if requested is not None and requested > self.settings.max_tokens_cap:
            raise APIError(400, f"max_tokens {requested} exceeds this server's cap of "
                           f"{self.settings.max_tokens_cap}", param="max_tokens", code="invalid_value")
        if requested is None:
            return min(default or self.settings.max_tokens_cap, self.settings.max_tokens_cap, limit - prompt_len)
        if prompt_len + requested > limit:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({requested}) exceeds the "
                           f"context of {limit} tokens", param="max_tokens", code="context_length_exceeded")
        return requested

    def _fallback(self, reason: str, detail: str = "") -> tuple[None, str]:
        self.fallbacks[reason] += 1
        self._fallback_metric.inc(tags={"reason": reason})
        total = sum(self.fallbacks.values())
        if total == 1 or total % 100 == 0:
            logger.warning("predictor fallback #%d (%s) %s: request placed %s", total, reason, detail,
                           "first (FCFS)" if reason == "disabled" or self.settings.unscored_placement == "first"
                           else "at the neutral score")
        return None, reason

    async def _predict(self, text: str) -> tuple[Prediction | None, str | None, Any]:
        """(prediction, fallback reason, pending): the request proceeds either way. On a timeout with
        `late_scores`, `pending` is the predictor's answer still on its way (a Ray ObjectRef), which the
        engine replica applies when it lands."""
        if self._predictor is None:
            return (*self._fallback("disabled"), None)
        if time.monotonic() < self._breaker_open_until:
            return (*self._fallback("circuit_open"), None)
        reason, detail, pending, response = None, "", None, None
        deadline = time.monotonic() + self.settings.predictor_timeout_s
        try:
            response = self._predictor.score.remote(text)
            ref = await asyncio.wait_for(response._to_object_ref(), timeout=self.settings.predictor_timeout_s)
            answer = asyncio.wrap_future(ref.future())
            try:
                prediction = await asyncio.wait_for(asyncio.shield(answer),
                                                    timeout=max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                pending = ref if self.settings.late_scores else None
                raise
            self._failures = 0
            return prediction, None, None
        except asyncio.TimeoutError:
            reason = "timeout"
            if pending is None and response is not None:
                response.cancel()
        except PredictorUnavailable as exc:
            reason, detail = "unavailable", str(exc)[:200]
        except Exception as exc:  # replica crash, deleted app, drill: never fail the request for it
            reason, detail = "error", f"{type(exc).__name__}: {str(exc)[:200]}"
        self._failures += 1
        if self._failures >= self.settings.breaker_failures:
            self._breaker_open_until = time.monotonic() + self.settings.breaker_cooldown_s
            self._failures = 0
        return (*self._fallback(reason, detail), pending)

    def _override(self, request: Request) -> Prediction | None:
        """A client-supplied prediction (oracle experiments, tests); only when the config allows it."""
        raw = request.headers.get(SCORE_OVERRIDE_HEADER)
        raw_expected = request.headers.get(EXPECTED_OVERRIDE_HEADER)
        if raw is None and raw_expected is None:
            return None
        if not self.settings.allow_score_override:
            raise APIError(400, f"{SCORE_OVERRIDE_HEADER} is not allowed on this server", code="invalid_value")
        try:
            score = float(raw) if raw is not None else None
            expected = float(raw_expected) if raw_expected is not None else None
        except ValueError:
            raise APIError(400, f"{SCORE_OVERRIDE_HEADER} and {EXPECTED_OVERRIDE_HEADER} must be numbers",
                           code="invalid_value") from None
        if score is None:
            raise APIError(400, f"{EXPECTED_OVERRIDE_HEADER} needs {SCORE_OVERRIDE_HEADER}", code="invalid_value")
        return Prediction(score, expected)

    async def _generate(self, request: Request, kind: Literal["completion", "chat"], body: Any,
                        prompt_ids: list[int], predictor_text: str, max_tokens: int) -> Response:
        request_id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        override = self._override(request)
        placement = "predicted"
        pending = None
        if override is not None:
            prediction, reason, placement = override, "override", "override"
        else:
            prediction, reason, pending = await self._predict(predictor_text)
            if prediction is not None:
                self._neutral.observe(prediction)
            elif reason != "disabled" and self.settings.unscored_placement == "neutral":
                prediction = self._neutral.prediction()
                if prediction is not None:
                    placement = "neutral"
                    self.neutral_placements += 1
        score = prediction.score if prediction else None
        expected = prediction.expected_tokens if prediction else None
        engine_request = EngineRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, sampling=body.sampling(max_tokens),
            score=score, predicted_work=request_work(expected, len(prompt_ids)), late_prediction=pending)
        self.requests[kind] += 1
        headers = {SCORE_HEADER: "none" if score is None else repr(score), "x-ltr-request-id": request_id}
        if reason is not None:
            headers[FALLBACK_HEADER] = reason
        headers[PLACEMENT_HEADER] = placement if score is not None else "first"
        first, stream = await self._start(engine_request)
        headers[REPLICA_HEADER] = first.replica
        self.replicas_seen[first.replica] += 1
        created = int(time.time())
        model = self.settings.served_model_name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(kind, request_id, created, model, first, stream, include_usage),
                                     media_type="text/event-stream", headers=headers)
        chunks = [first]
        try:
            async for chunk in stream:
                chunks.append(chunk)
        except Exception as exc:
            raise self._engine_error(exc) from None
        finally:
            stream.cancel()  # no-op when exhausted; aborts in the engine when we were cancelled
        return JSONResponse(self._full_response(kind, request_id, created, model, chunks), headers=headers)

    async def _start(self, engine_request: EngineRequest) -> tuple[EngineChunk, Any]:
        """The request's first chunk and its stream. A replica that dies before producing any output
        is retried once on another replica: nothing reached the client, so the retry is safe."""
        for attempt in (1, 2):
            stream = self.engine.options(stream=True).generate.remote(engine_request)
            try:
                return await stream.__anext__(), stream
            except StopAsyncIteration:
                raise APIError(500, "engine returned no output", "server_error") from None
            except Exception as exc:
                stream.cancel()
                error = self._engine_error(exc)
                if attempt == 2 or error.code != "engine_unavailable":
                    raise error from None
                self.requests["retried_before_output"] += 1
                logger.warning("engine replica failed before request %s produced output; retrying once",
                               engine_request.request_id)
        raise AssertionError("unreachable")

    @staticmethod
    def _engine_error(exc: Exception) -> APIError:
        logger.warning("engine request failed: %s: %s", type(exc).__name__, str(exc)[:300])
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        if isinstance(exc, (ActorDiedError, ActorUnavailableError)):
            return APIError(503, "the engine replica serving this request failed; retry", "server_error",
                            code="engine_unavailable")
        if any(cls.__name__ == "VLLMClientError" for cls in type(exc).__mro__):
            # vLLM's own request validation (the ingress checks most fields first): the client's fault.
            return APIError(400, f"invalid request: {str(exc).splitlines()[-1][:300]}", code="invalid_value")
        return APIError(500, f"engine error: {type(exc).__name__}", "server_error", code="engine_error")

    @staticmethod
    def _usage(last: EngineChunk) -> dict[str, int]:
        return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                "total_tokens": last.prompt_tokens + last.completion_tokens}

    def _full_response(self, kind: str, request_id: str, created: int, model: str,
                       chunks: list[EngineChunk]) -> dict[str, Any]:
        text = "".join(c.text for c in chunks)
        last = chunks[-1]
        if kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
            obj = "text_completion"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": last.finish_reason}
            obj = "chat.completion"
        return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [choice],
                "usage": self._usage(last)}

    async def _sse(self, kind: str, request_id: str, created: int, model: str, first: EngineChunk,
                   stream: Any, include_usage: bool) -> AsyncIterator[str]:
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"

        def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
            payload: dict[str, Any] = {"id": request_id, "object": obj, "created": created, "model": model,
                                       "choices": [] if choice is None else [choice]}
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        def choice_of(chunk: EngineChunk, role: bool = False) -> dict[str, Any]:
            if kind == "completion":
                return {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": chunk.finish_reason}
            delta: dict[str, Any] = {"content": chunk.text}
            if role:
                delta["role"] = "assistant"
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": chunk.finish_reason}

        last = first
        try:
            yield event(choice_of(first, role=True))
            async for chunk in stream:
                last = chunk
                yield event(choice_of(chunk))
            if include_usage:
                yield event(None, self._usage(last))
        except Exception as exc:
            yield f"data: {json.dumps(self._engine_error(exc).body())}\n\n"
        finally:
            stream.cancel()  # client gone or error: the engine aborts the request
        yield "data: [DONE]\n\n"

    # -- routes --------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        return {"object": "list", "data": [{"id": self.settings.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "ltr-serve"}]}

    @api.post("/v1/completions", openapi_extra=_openapi_body(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        self._check_auth(request)
        body: CompletionRequest = self._parse(CompletionRequest, await self._read_json(request))
        prompt_ids = self.tokenizer(body.prompt).input_ids
        max_tokens = self._max_tokens(body.max_tokens, len(prompt_ids), self.settings.default_completion_max_tokens)
        return await self._generate(request, "completion", body, prompt_ids, body.prompt, max_tokens)

    @api.post("/v1/chat/completions", openapi_extra=_openapi_body(ChatRequest))
    async def chat_completions(self, request: Request) -> Response:
        self._check_auth(request)
        body: ChatRequest = self._parse(ChatRequest, await self._read_json(request))
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = self.tokenizer(rendered, add_special_tokens=False).input_ids
        user_text = next(m.text() for m in reversed(body.messages) if m.role == "user")
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self._max_tokens(requested, len(prompt_ids), None)
        return await self._generate(request, "chat", body, prompt_ids, user_text, max_tokens)

    @api.get("/v1/ltr/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """Debug counters of this ingress replica: fallbacks by reason and replicas that served it."""
        self._check_auth(request)
        return self._ingress_stats()

    @api.get("/v1/ltr/engine_stats")
    async def engine_stats(self, request: Request) -> dict[str, Any]:
        """Every engine replica's debug stats, keyed by replica id (see `_sweep_engines`)."""
        self._check_auth(request)
        return {"replicas": await self._sweep_engines()}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Prometheus text format of this ingress's and every engine replica's counters."""
        self._check_auth(request)
        body = prometheus_text(self._ingress_stats(), await self._sweep_engines())
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def _ingress_stats(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "predictor_fallbacks": dict(self.fallbacks),
                "neutral_placements": self.neutral_placements, "replicas_seen": dict(self.replicas_seen),
                "breaker_open": time.monotonic() < self._breaker_open_until}

    async def _sweep_engines(self) -> dict[str, Any]:
        """Every engine replica's debug stats, from one sweep of probe calls.

        Each call carries the replicas seen so far and the least-work router sends it to an unseen one;
        the sweep ends at the first few repeats in a row. (Ray's default router ignores the probe, so
        with it the sweep samples replicas at random and may miss some.)
        """
        replicas: dict[str, Any] = {}
        repeats = 0
        for _ in range(ENGINE_STATS_MAX_CALLS):
            try:
                stats = await self.engine.debug_stats.remote(ReplicaProbe(frozenset(replicas)))
            except Exception as exc:
                raise self._engine_error(exc) from exc
            repeats = repeats + 1 if stats["replica"] in replicas else 0
            replicas[stats["replica"]] = stats
            if repeats >= ENGINE_STATS_REPEATS:
                break
        return replicas
