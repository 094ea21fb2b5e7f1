"""OpenAI-compatible HTTP ingress: only what vLLM's own OpenAI server does not do.

The protocol itself — request models, chat templates, sampling, structured outputs, tools, logprobs, `n`,
streaming, usage, error responses — is vLLM's serving layer, run inside each engine replica on its AsyncLLM
(`deployments/engine.py`). Here: API key, body cap, back-pressure (429 + Retry-After), the predictor call
(requests sent ahead of their score, timeout, circuit breaker, neutral placement, late scores), routing, our
`x-ltr-*` headers, debug routes
and `/metrics`. Bodies are parsed with vLLM's protocol models (`ChatCompletionRequest`,
`CompletionRequest`) before any of that, and refused with vLLM's own validation-error responses, so a bad
request costs no predictor call and fails as it fails on `vllm serve`. Every error, ours included, has
vLLM's shape: `{"error": {"message", "type", "param", "code": <status>}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from argparse import Namespace
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.exception_handling.handlers.http import http_exception_handler
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
from vllm.entrypoints.serve.utils.api_utils import validate_json_request

from deployments.engine import EngineRequest, ReplyHead
from deployments.metrics import WaitHistogram, prometheus_text
from deployments.neutral import NeutralPlacement, calibration_median
from deployments.predictor import Prediction, PredictorInput, PredictorUnavailable
from ltr.data.served_log import record_extra_args
from ltr.predictor.render import conversation_text, last_user_text
from ltr.routing import request_work

logger = logging.getLogger("ray.serve")

SCORE_HEADER = "x-ltr-score"
REPLICA_HEADER = "x-ltr-replica"
FALLBACK_HEADER = "x-ltr-fallback"
PLACEMENT_HEADER = "x-ltr-placement"
REQUEST_ID_HEADER = "x-ltr-request-id"
SCORE_OVERRIDE_HEADER = "x-ltr-score-override"
EXPECTED_OVERRIDE_HEADER = "x-ltr-expected-tokens-override"
#: Characters per token of the routing estimate of a prompt's length before vLLM has tokenized it (the
#: prefill term of `request_work` is small; the replica replaces it with the real count).
CHARS_PER_TOKEN = 4


# ---- settings --------------------------------------------------------------------------------------

class IngressSettings(BaseModel):
    """Validated once when the app is built; see `deployments/serve_config_*.yaml` for examples."""

    model_config = ConfigDict(extra="forbid")

    served_model_name: str
    #: Whether the engines log served traffic (set by `app.py` from `served_log`): then each request carries
    #: what the log records of it (`ltr.data.served_log.record_extra_args`).
    served_log: bool = False
    #: Log the scored text itself, not only its hash (the user's data: opt-in; `ltr train-predictor --data`
    #: needs it).
    log_text: bool = False
    #: Largest `max_tokens` a request may ask for (400 above it); also the engines' default output cap
    #: (vLLM's `override_generation_config.max_new_tokens`, set by `app.py`).
    max_tokens_cap: int = Field(1024, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    #: Generation requests this ingress replica holds at once (waiting for the predictor, queued in or
    #: running on an engine); one more is refused with 429 and `Retry-After`. Below the replica's
    #: `max_ongoing_requests` (app.INGRESS_MAX_ONGOING), so debug routes still get through.
    max_queued_requests: int = Field(512, ge=1, le=1000)
    retry_after_s: int = Field(1, ge=1)
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
    #: Send each request to its engine without waiting for the predictor, its score following: the engine
    #: holds it behind all other work until the score lands, or `predictor_timeout_s` after the call (then
    #: it is placed at the neutral score and re-ranked if its score still lands). Scoring then adds no
    #: latency where a seat is free and overlaps the queueing delay where none is. Needs `late_scores` and
    #: engines that re-rank (`engine_reranks`), and the served-traffic log off (a request that finished before
    #: its score landed would be logged without the predictor's answer); otherwise the ingress waits for the
    #: score, as with False.
    send_before_score: bool = True
    #: Whether the engines re-rank a request when its score lands: the rank scheduler's policies do, vLLM's
    #: own fcfs and priority queues do not. Set by `app.py` from the engines' policy.
    engine_reranks: bool = True
    #: Most late answers (the predictor's, after a timeout) in flight at once, when the ingress waited for
    #: them (a request sent ahead of its score carries its answer from the start, until it finishes).
    max_late_in_flight: int = Field(256, ge=0)
    #: Predictor failures in a row that open the circuit breaker (no predictor calls for `breaker_cooldown_s`).
    #: A failure is an error, a timeout whose answer is not followed, or a followed answer that fails or
    #: has not landed `breaker_late_answer_s` after the call (None: 10x `predictor_timeout_s`). A slow answer
    #: that lands is a success: an overloaded predictor keeps ranking late instead of being cut off.
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_s: float = Field(5.0, gt=0)
    breaker_late_answer_s: float | None = Field(None, gt=0)
    #: Trust a client-supplied score header (oracle experiments, scheduler tests); off in production.
    allow_score_override: bool = False
    #: Use the engine deployment of another Serve application instead of a bound one (extra ingresses).
    engine_app: str | None = None
    #: How long `/metrics` and `/v1/ltr/engine_stats` wait for the engine replicas' answers.
    engine_stats_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _late_answer_after_timeout(self) -> IngressSettings:
        if self.breaker_late_answer_s is None:
            self.breaker_late_answer_s = 10 * self.predictor_timeout_s
        elif self.breaker_late_answer_s <= self.predictor_timeout_s:
            raise ValueError(f"breaker_late_answer_s ({self.breaker_late_answer_s}) must exceed predictor_timeout_s "
                             f"({self.predictor_timeout_s}): a late answer is one that missed the timeout")
        return self


# ---- placement -------------------------------------------------------------------------------------

@dataclass
class Placement:
    """How the ingress placed one request: what the engine gets, and what the `x-ltr-*` headers say."""

    #: The score the request is sent with (the predictor's, a neutral one, an override), or None.
    prediction: Prediction | None
    #: predicted | neutral | first | override, or pending: sent ahead of its score (see `settled`).
    how: str
    #: Why the predictor did not place it (a fallback reason), if it did not.
    reason: str | None = None
    #: The predictor's answer still on its way (a Ray ObjectRef), which the engine replica applies.
    pending: Any = None
    #: Sent ahead of its score: resolves to the placement it ends with once its score lands in time, fails,
    #: or misses the timeout (`release_at`, monotonic seconds; then the engine releases it at `prediction`).
    settled: asyncio.Future | None = None
    release_at: float = 0.0

    def known(self) -> Placement:
        """This placement as far as known now: the settled one, or itself while the score is on its way."""
        return self.settled.result() if self.settled is not None and self.settled.done() else self


# ---- errors ----------------------------------------------------------------------------------------

class APIError(Exception):
    """An error of ours (auth, body cap, back-pressure, our own limits), answered in vLLM's error shape."""

    def __init__(self, status: HTTPStatus, message: str, err_type: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.err_type, self.param, self.headers = status, message, err_type, param, headers

    def body(self) -> dict[str, Any]:
        return create_error_response(self.message, self.err_type, self.status, self.param).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status.value, headers=self.headers)


def _openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a route that parses its body itself (size cap first, then the model).

    The routes read the raw body so oversized requests are refused before parsing; declaring the
    schema here keeps /openapi.json complete for clients and schema-driven fuzzing. `$defs` are
    inlined because OpenAPI resolves `$ref` against the whole document, not the schema.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any, seen: frozenset[str] = frozenset()) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                return {} if name in seen else inline(defs[name], seen | {name})   # recursive types: open
            return {key: inline(value, seen) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value, seen) for value in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


api = FastAPI(title="ltr-serve", description="OpenAI-compatible LLM serving ranked by predicted output length")
#: vLLM's exception handlers (validation errors, HTTP errors, the rest) answer as `vllm serve` does; they
#: read this one server argument.
api.state.args = Namespace(log_error_stack=False)
init_exception_handler(api)
api.exception_handler(StarletteHTTPException)(http_exception_handler)   # unknown routes, wrong methods


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


def _field(message: Any, name: str) -> Any:
    """A chat message's field: messages are dicts (TypedDicts) or, for some of vLLM's types, pydantic models."""
    return message.get(name) if isinstance(message, dict) else getattr(message, name, None)


def _text_of(content: Any) -> str:
    """The text of a chat message's content (a string, or a list of parts of which the text ones count)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (_field(part, "text") for part in content)
        return "".join(text for text in texts if isinstance(text, str))
    return ""


def _fallback_text(item: PredictorInput) -> str:
    """The text a request is known by when the predictor did not score it: the prompt, or the chat's last
    user message ("" when it has none, which the predictor could not score either)."""
    if isinstance(item, str):
        return item
    try:
        return last_user_text(item)
    except ValueError:
        return ""


def _has_text(item: PredictorInput) -> bool:
    """Whether the predictor has something to read: a prompt, or a chat with a user message."""
    return bool(_fallback_text(item).strip())


# ---- the deployment --------------------------------------------------------------------------------

@serve.ingress(api)
class OpenAIIngress:
    """FastAPI ingress; `app.py` wraps it with `serve.deployment` options and binds the engine."""

    def __init__(self, engine: DeploymentHandle | None, settings: dict[str, Any]) -> None:
        self.settings = IngressSettings(**settings)
        if engine is None:
            if not self.settings.engine_app:
                raise ValueError("no engine bound and no engine_app configured")
            engine = serve.get_deployment_handle("LLMEngine", app_name=self.settings.engine_app)
        self.engine = engine
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve
            self.replica = "local"
        self._api_key = os.environ.get(self.settings.api_key_env or "", "") or None
        self._predictor: DeploymentHandle | None = None
        if self.settings.predictor_app:
            self._predictor = serve.get_deployment_handle(
                self.settings.predictor_deployment, app_name=self.settings.predictor_app,
                # Its answer must be a Ray ObjectRef, which a late score hands on to the engine; Serve's
                # gRPC transport (the HAProxy front's throughput mode) has none.
                _check_exists=False).options(_by_reference=True)
        self._failures = 0
        self._breaker_open_until = 0.0
        self.breaker_openings = 0
        self._late_in_flight = 0
        #: Fallbacks sent on with the predictor's answer following them (re-ranked in the engine on landing),
        #: and how those answers ended here: landed, failed, or overdue (not landed `breaker_late_answer_s`
        #: after the call; it may still land); and timed-out calls no replica had taken yet
        #: (`_judge_assignment`): assigned_late, assignment_failed or unassigned.
        self.late_sent = 0
        #: Requests sent to an engine ahead of their score (`send_before_score`: a predictor replica had taken
        #: the call, its answer was not in yet); one whose answer was in by then goes with it.
        self.sent_ahead = 0
        self.late_answers: Counter[str] = Counter()
        self.predictor_waits = WaitHistogram()
        self.predictor_replica_times = WaitHistogram()   # the part of each wait spent in the predictor replica
        self.fallbacks: Counter[str] = Counter()
        self._neutral = NeutralPlacement(self.settings.neutral_window, calibration_median())
        self.neutral_placements = 0
        self.replicas_seen: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.in_flight = 0
        from ray.util.metrics import Counter as MetricCounter

        self._fallback_metric = MetricCounter(
            "ltr_predictor_fallbacks",
            description="Requests the predictor did not score, by reason (placed at the neutral score unless "
                        "unscored_placement is 'first', or no predictor is configured).",
            tag_keys=("reason",))

    # -- what is ours: auth, body cap, parsing with vLLM's models --------------------------------------

    def _check_auth(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key.encode()):
            raise APIError(HTTPStatus.UNAUTHORIZED, "invalid or missing API key (use 'Authorization: Bearer <key>')",
                           "AuthenticationError", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        too_large = APIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body exceeds {limit} bytes",
                             "RequestTooLargeError")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def _parse(self, request: Request, model: type[BaseModel]) -> tuple[dict[str, Any], Any]:
        """(JSON body, vLLM's parsed request), refusing as FastAPI + vLLM's server would: JSON errors, then
        vLLM's content-type rule, then the protocol model's validation (`RequestValidationError` goes to
        vLLM's handler)."""
        raw = await self._read_body(request)
        data: Any = None
        if raw:
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos),
                                               "msg": "JSON decode error", "input": {},
                                               "ctx": {"error": exc.msg}}]) from None
            except Exception:  # invalid UTF-8, nesting too deep: FastAPI's answer
                raise StarletteHTTPException(400, "There was an error parsing the body") from None
        await validate_json_request(request)
        if data is None:   # no body at all
            raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required",
                                           "input": None}])
        try:
            parsed = model.model_validate(data, from_attributes=True)   # FastAPI's mode: its error for a non-object
        except ValidationError as exc:
            raise RequestValidationError([{**error, "loc": ("body", *error["loc"])}
                                          for error in exc.errors(include_url=False)]) from None
        return data, parsed

    def _check_cap(self, parsed: Any) -> None:
        """This server's output cap (ours; vLLM would silently shorten the answer instead)."""
        for field in ("max_tokens", "max_completion_tokens"):
            requested = getattr(parsed, field, None)
            if requested is not None and requested > self.settings.max_tokens_cap:
                raise APIError(HTTPStatus.BAD_REQUEST, f"{field} {requested} exceeds this server's cap of "
                               f"{self.settings.max_tokens_cap}", "BadRequestError", param=field)

    # -- the predictor ---------------------------------------------------------------------------------

    def _fallback(self, reason: str, detail: str = "") -> tuple[None, str]:
        self.fallbacks[reason] += 1
        self._fallback_metric.inc(tags={"reason": reason})
        total = sum(self.fallbacks.values())
        if total == 1 or total % 100 == 0:
            logger.warning("predictor fallback #%d (%s) %s: request placed %s", total, reason, detail,
                           "first (FCFS)" if reason == "disabled" or self.settings.unscored_placement == "first"
                           else "at the neutral score")
        return None, reason

    @property
    def _sends_ahead(self) -> bool:
        s = self.settings
        return s.send_before_score and s.late_scores and s.engine_reranks and not s.served_log

    def _fallback_prediction(self, reason: str | None) -> Prediction | None:
        """Where a request the predictor did not score goes: the neutral score, or None (first)."""
        if reason == "disabled" or self.settings.unscored_placement != "neutral":
            return None
        return self._neutral.prediction()

    def _placed_without_score(self, reason: str, prediction: Prediction | None) -> Placement:
        if prediction is not None:
            self.neutral_placements += 1
        return Placement(prediction, "neutral" if prediction is not None else "first", reason)

    async def _predict(self, item: PredictorInput) -> tuple[Prediction | None, str | None, Any, Placement | None]:
        """(prediction, fallback reason, pending, ahead): the request proceeds either way. On a timeout with
        `late_scores`, `pending` is the predictor's answer still on its way (a Ray ObjectRef), which the
        engine replica applies when it lands (at most `max_late_in_flight` such answers at once). Sending
        ahead of the score (`send_before_score`), `ahead` is the request's placement as soon as a predictor
        replica has taken the call (`_follow_ahead`)."""
        if self._predictor is None:
            return (*self._fallback("disabled"), None, None)
        if not _has_text(item):
            return (*self._fallback("no_text"), None, None)
        if time.monotonic() < self._breaker_open_until:
            return (*self._fallback("circuit_open"), None, None)
        reason, detail, pending, response, assignment, unassigned = None, "", None, None, None, False
        started = time.monotonic()
        deadline = started + self.settings.predictor_timeout_s
        try:
            response = self._predictor.score.remote(item)
            assignment = asyncio.ensure_future(response._to_object_ref())
            ref = await asyncio.wait_for(asyncio.shield(assignment), timeout=self.settings.predictor_timeout_s)
            answer = asyncio.wrap_future(ref.future())
            if self._sends_ahead and not answer.done():
                self.sent_ahead += 1
                return None, None, None, self._follow_ahead(ref, answer, started)
            try:
                prediction = await asyncio.wait_for(asyncio.shield(answer),
                                                    timeout=max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                pending = self._follow_late(ref, answer, started)
                raise
            self._failures = 0
            self._observe_wait(started, prediction)
            return prediction, None, None, None
        except asyncio.TimeoutError:
            reason = "timeout"
            unassigned = assignment is not None and not assignment.done()
            if unassigned:
                self._judge_assignment(assignment, response, started)
            elif pending is None and response is not None:
                response.cancel()
        except PredictorUnavailable as exc:
            reason, detail = "unavailable", str(exc)[:200]
        except Exception as exc:  # replica crash, deleted app, drill: never fail the request for it
            reason, detail = "error", f"{type(exc).__name__}: {str(exc)[:200]}"
        if pending is None and not unassigned:   # those are judged later (`_follow_late`, `_judge_assignment`)
            self._predictor_failed()
        return (*self._fallback(reason, detail), pending, None)

    def _follow_ahead(self, ref: Any, answer: asyncio.Future, started: float) -> Placement:
        """The placement of a request sent ahead of its score, and the accounting of its answer. In time
        (`predictor_timeout_s` after the call) the answer places the request as if awaited here. One that
        fails first, or misses the timeout, is a fallback of that reason placed at the neutral score, which
        is what the engine releases the request at; a late answer is then judged as `_follow_late`'s."""
        fallback = self._fallback_prediction("timeout")
        settled: asyncio.Future = asyncio.get_running_loop().create_future()
        deadline = started + self.settings.predictor_timeout_s

        def expired() -> None:
            if answer.done():
                return   # settled by `landed`, which runs next
            self.late_sent += 1
            self._fallback("timeout")
            settled.set_result(self._placed_without_score("timeout", fallback))
            self._judge_late(answer, started, ("landed", "failed", "overdue"), success_resets=True,
                             on_settled=lambda done: self._observe_answer(started, done))

        def landed(done: asyncio.Future) -> None:
            if settled.done():
                return   # already expired: judged by `_judge_late`
            timer.cancel()
            error = None if done.cancelled() else done.exception()
            if done.cancelled() or error is not None:
                reason = "unavailable" if isinstance(error, PredictorUnavailable) else "error"
                self._predictor_failed()
                self._fallback(reason, "cancelled" if error is None else f"{type(error).__name__}: {str(error)[:200]}")
                settled.set_result(self._placed_without_score(reason, fallback))
                return
            prediction = done.result()
            self._failures = 0
            self._observe_wait(started, prediction)
            self._neutral.observe(prediction)
            settled.set_result(Placement(prediction, "predicted"))

        timer = asyncio.get_running_loop().call_later(max(deadline - time.monotonic(), 0.0), expired)
        answer.add_done_callback(landed)
        return Placement(fallback, "pending", pending=ref, settled=settled, release_at=deadline)

    def _observe_answer(self, started: float, done: asyncio.Future) -> None:
        """The wait for an answer that settled after the ingress stopped waiting, if it is a prediction."""
        if not done.cancelled() and done.exception() is None:
            self._observe_wait(started, done.result())

    def _observe_wait(self, started: float, prediction: Prediction) -> None:
        self.predictor_waits.observe(time.monotonic() - started)
        if prediction.replica_s is not None:
            self.predictor_replica_times.observe(prediction.replica_s)

    def _predictor_failed(self) -> None:
        """One more failure in a row; `breaker_failures` of them open the breaker."""
        self._failures += 1
        if self._failures >= self.settings.breaker_failures:
            self._breaker_open_until = time.monotonic() + self.settings.breaker_cooldown_s
            self.breaker_openings += 1
            self._failures = 0

    def _follow_late(self, ref: Any, answer: asyncio.Future, started: float) -> Any:
        """`ref` as the request's late answer when late scores are on and below their in-flight bound
        (counted until it lands), else None. The answer is judged for the breaker when it lands (`_judge_late`):
        a success resets its count."""
        if not self.settings.late_scores or self._late_in_flight >= self.settings.max_late_in_flight:
            return None
        self._late_in_flight += 1
        self.late_sent += 1

        def landed(done: asyncio.Future) -> None:
            self._late_in_flight -= 1
            self._observe_answer(started, done)   # the engine replica applies the score

        self._judge_late(answer, started, ("landed", "failed", "overdue"), success_resets=True, on_settled=landed)
        return ref

    def _judge_assignment(self, assignment: asyncio.Future, response: Any, started: float) -> None:
        """A call Serve's router had not handed to a predictor replica when the timeout hit (every replica
        busy, or slow to answer the router's probe): its request went on unscored, so the call is cancelled
        as soon as a replica takes it (its answer would reach no one, and it would hold a batch slot). It is
        judged by that assignment (`_judge_late`): taken in time is busy, not broken (13 such timeouts,
        counted as failures at once, opened the breaker for 51 requests in `peer_bench_p240_run3.json`), and
        does not reset the count, since no answer was seen."""
        self._judge_late(assignment, started, ("assigned_late", "assignment_failed", "unassigned"),
                         success_resets=False, on_settled=lambda _: response.cancel(), on_overdue=response.cancel)

    def _judge_late(self, future: asyncio.Future, started: float, outcomes: tuple[str, str, str], *,
                    success_resets: bool, on_settled: Callable[[asyncio.Future], Any],
                    on_overdue: Callable[[], Any] = lambda: None) -> None:
        """Judge a timed-out call for the breaker, once: `future` failing counts as a failure, and so does its
        not settling `breaker_late_answer_s` after `started`; settling in time resets the count if
        `success_resets`. `outcomes` (success, failure, overdue) are its `late_answers` keys; one that settles
        after it was overdue is counted there again."""
        judged = False

        def overdue() -> None:
            nonlocal judged
            judged = True
            self.late_answers[outcomes[2]] += 1
            self._predictor_failed()
            on_overdue()

        def settled(done: asyncio.Future) -> None:
            timer.cancel()
            on_settled(done)
            if done.cancelled():
                return
            failed = done.exception() is not None
            self.late_answers[outcomes[1] if failed else outcomes[0]] += 1
            if judged:
                return
            if failed:
                self._predictor_failed()
            elif success_resets:
                self._failures = 0

        timer = asyncio.get_running_loop().call_later(
            max(started + self.settings.breaker_late_answer_s - time.monotonic(), 0.0), overdue)
        future.add_done_callback(settled)

    def _override(self, request: Request) -> Prediction | None:
        """A client-supplied prediction (oracle experiments, tests); only when the config allows it."""
        raw = request.headers.get(SCORE_OVERRIDE_HEADER)
        raw_expected = request.headers.get(EXPECTED_OVERRIDE_HEADER)
        if raw is None and raw_expected is None:
            return None
        if not self.settings.allow_score_override:
            raise APIError(HTTPStatus.BAD_REQUEST, f"{SCORE_OVERRIDE_HEADER} is not allowed on this server",
                           "BadRequestError")
        try:
            score = float(raw) if raw is not None else None
            expected = float(raw_expected) if raw_expected is not None else None
        except ValueError:
            raise APIError(HTTPStatus.BAD_REQUEST, f"{SCORE_OVERRIDE_HEADER} and {EXPECTED_OVERRIDE_HEADER} must "
                           "be numbers", "BadRequestError") from None
        if score is None:
            raise APIError(HTTPStatus.BAD_REQUEST, f"{EXPECTED_OVERRIDE_HEADER} needs {SCORE_OVERRIDE_HEADER}",
                           "BadRequestError")
        return Prediction(score, expected)

    async def _place(self, request: Request, served: bool, item: PredictorInput) -> Placement:
        override = self._override(request)
        if override is not None:
            return Placement(override, "override", "override")
        if not served:   # vLLM answers 404 for this model name: nothing to score
            return Placement(None, "first")
        prediction, reason, pending, ahead = await self._predict(item)
        if ahead is not None:
            return ahead
        if prediction is not None:
            self._neutral.observe(prediction)
            return Placement(prediction, "predicted", reason, pending)
        placement = self._placed_without_score(reason, self._fallback_prediction(reason))
        placement.pending = pending
        return placement

    # -- one generation request ------------------------------------------------------------------------

    async def _generate(self, request: Request, kind: Literal["chat", "completion"], data: dict[str, Any],
                        parsed: Any, item: PredictorInput, prompt_chars: int) -> Response:
        self._check_cap(parsed)
        if self.in_flight >= self.settings.max_queued_requests:
            self.requests["rejected_queue_full"] += 1
            raise APIError(HTTPStatus.TOO_MANY_REQUESTS, f"this server holds {self.in_flight} requests, its "
                           "limit; retry later", "RateLimitError",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        self.in_flight += 1
        try:
            response = await self._generate_admitted(request, kind, data, parsed, item, prompt_chars)
        except BaseException:
            self.in_flight -= 1
            raise
        if not isinstance(response, StreamingResponse):
            self.in_flight -= 1
        return response

    async def _generate_admitted(self, request: Request, kind: Literal["chat", "completion"],
                                 data: dict[str, Any], parsed: Any, item: PredictorInput,
                                 prompt_chars: int) -> Response:
        hex_id = uuid.uuid4().hex
        request_id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{hex_id}"
        body = dict(data)
        body.setdefault("request_id", hex_id)   # vLLM names its answer "<prefix>-<request_id>"
        served = parsed.model in (None, self.settings.served_model_name)
        placement = await self._place(request, served, item)
        prediction = placement.prediction
        expected = prediction.expected_tokens if prediction else None
        scored_text = prediction.input_text if placement.how == "predicted" and prediction else None
        log_text = self.settings.log_text if self.settings.served_log else None
        known_by = scored_text or _fallback_text(item)
        # A chat's messages go with it for a retraining to render, if the predictor's renderer can read them.
        messages = item if isinstance(item, list) and _has_text(item) else None
        log_fields = record_extra_args(known_by, prediction.version if scored_text is not None else None,
                                       log_text, conversation_text(item), messages)
        engine_request = EngineRequest(
            kind=kind, body=body, request_id=request_id, score=prediction.score if prediction else None,
            expected_tokens=expected, predicted_work=request_work(expected, prompt_chars // CHARS_PER_TOKEN),
            late_prediction=placement.pending, score_pending=placement.settled is not None,
            release_after_s=max(placement.release_at - time.monotonic(), 0.0), log_fields=log_fields,
            log_text=log_text)
        self.requests[kind] += 1
        head, stream = await self._start(engine_request)
        first = None
        if head.body is None and placement.settled is not None and not placement.settled.done():
            # The headers go out with the first event: they say how the request was placed if its score has
            # landed by then, and "pending" if not (the first token is never held for them).
            first = asyncio.ensure_future(stream.__anext__())
            try:
                await asyncio.wait({first, placement.settled}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:   # client gone: the replica aborts the request
                first.cancel()
                stream.cancel()
                raise
        headers = self._placement_headers(placement.known(), request_id)
        headers[REPLICA_HEADER] = head.replica
        self.replicas_seen[head.replica] += 1
        if head.body is not None:
            async for _ in stream:   # the head was the whole answer: let the replica's call end by itself
                pass
            return JSONResponse(head.body, status_code=head.status, headers=headers)
        return StreamingResponse(self._relay(stream, first), media_type="text/event-stream", headers=headers)

    @staticmethod
    def _placement_headers(placement: Placement, request_id: str) -> dict[str, str]:
        prediction = placement.prediction if placement.how != "pending" else None
        headers = {SCORE_HEADER: "pending" if placement.how == "pending" else
                   "none" if prediction is None else repr(prediction.score),
                   REQUEST_ID_HEADER: request_id, PLACEMENT_HEADER: placement.how}
        if placement.reason is not None:
            headers[FALLBACK_HEADER] = placement.reason
        return headers

    async def _start(self, engine_request: EngineRequest) -> tuple[ReplyHead, Any]:
        """The reply's head and its stream. A replica that dies before answering is retried once on
        another replica: nothing reached the client, so the retry is safe."""
        for attempt in (1, 2):
            stream = self.engine.options(stream=True).openai.remote(engine_request)
            try:
                return await stream.__anext__(), stream
            except asyncio.CancelledError:   # client gone: the replica aborts the request
                stream.cancel()
                raise
            except StopAsyncIteration:
                raise APIError(HTTPStatus.INTERNAL_SERVER_ERROR, "engine returned no output",
                               "InternalServerError") from None
            except Exception as exc:
                stream.cancel()
                error = self._engine_error(exc)
                if attempt == 2 or error.status != HTTPStatus.SERVICE_UNAVAILABLE:
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
            return APIError(HTTPStatus.SERVICE_UNAVAILABLE, "the engine replica serving this request failed; "
                            "retry", "ServiceUnavailableError")
        return APIError(HTTPStatus.INTERNAL_SERVER_ERROR, f"engine error: {type(exc).__name__}",
                        "InternalServerError")

    async def _relay(self, stream: Any, first: asyncio.Future | None = None) -> AsyncIterator[str]:
        """vLLM's SSE strings as they come (`first`: the stream's first, already asked for); an engine failure
        mid-stream ends the stream as vLLM's own generators end theirs (an error event, then `[DONE]`)."""
        try:
            if first is not None:
                try:
                    yield await first
                except StopAsyncIteration:
                    return
            async for event in stream:
                yield event
        except Exception as exc:
            yield f"data: {json.dumps(self._engine_error(exc).body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1
            stream.cancel()  # client gone or error: the engine aborts the request

    # -- routes --------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        self._check_auth(request)
        return await self.engine.models.remote()

    @api.post("/v1/completions", openapi_extra=_openapi_body(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        self._check_auth(request)
        data, parsed = await self._parse(request, CompletionRequest)
        prompt = parsed.prompt
        texts = [prompt] if isinstance(prompt, str) else [p for p in prompt or [] if isinstance(p, str)]
        text = "\n".join(texts)
        return await self._generate(request, "completion", data, parsed, text, len(text))

    @api.post("/v1/chat/completions", openapi_extra=_openapi_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Response:
        self._check_auth(request)
        data, parsed = await self._parse(request, ChatCompletionRequest)
        # Scored as the conversation: the predictor deployment renders it with its artifact's renderer.
        messages = [{"role": _field(message, "role"), "content": _text_of(_field(message, "content"))}
                    for message in parsed.messages]
        return await self._generate(request, "chat", data, parsed, messages,
                                    sum(len(m["content"]) for m in messages))

    @api.get("/v1/ltr/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """Debug counters of this ingress replica: fallbacks by reason and replicas that served it."""
        self._check_auth(request)
        return self._ingress_stats()

    @api.get("/v1/ltr/engine_stats")
    async def engine_stats(self, request: Request) -> dict[str, Any]:
        """Every engine replica's debug stats, keyed by replica id (see `_every_engine`)."""
        self._check_auth(request)
        replicas, failures = await self._every_engine("debug_stats")
        return {"replicas": replicas, "failed_calls": failures}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Prometheus text: this ingress's counters, every engine replica's counters, and vLLM's own metrics
        of every engine replica (label `replica`). A replica that fails to answer is left out."""
        self._check_auth(request)
        (engines, stats_failures), (vllm, vllm_failures) = await asyncio.gather(
            self._every_engine("debug_stats"), self._every_engine("vllm_metrics"))
        body = prometheus_text(self.replica, self._ingress_stats(), engines,
                               {replica: answer["text"] for replica, answer in vllm.items()},
                               scrape_failures=stats_failures + vllm_failures)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def _ingress_stats(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "predictor_fallbacks": dict(self.fallbacks),
                "neutral_placements": self.neutral_placements, "late_sent": self.late_sent,
                "sent_ahead": self.sent_ahead,
                "late_answers": dict(self.late_answers), "predictor_wait_s": self.predictor_waits.snapshot(),
                "predictor_replica_s": self.predictor_replica_times.snapshot(),
                "replicas_seen": dict(self.replicas_seen),
                "breaker_open": time.monotonic() < self._breaker_open_until,
                "breaker_openings": self.breaker_openings, "in_flight": self.in_flight}

    async def _every_engine(self, method: str) -> tuple[dict[str, Any], int]:
        """({replica: answer}, failed replicas) of `method` called on every running engine replica.

        Serve's `broadcast` sends the call to each replica directly, past the router (no queue-length
        probes, so a busy replica still answers). A replica that raises is left out and counted; one that
        does not answer within `engine_stats_timeout_s` costs the whole call (counted once): Serve's health
        check replaces a hung replica.
        """
        try:
            answers = await self.engine.broadcast(method).results_async(
                timeout_s=self.settings.engine_stats_timeout_s, return_exceptions=True)
        except Exception as exc:   # timeout, or no replica running: an empty answer, not a failed route
            logger.warning("engine %s broadcast failed: %s: %s", method, type(exc).__name__, str(exc)[:200])
            return {}, 1
        replicas = {answer["replica"]: answer for answer in answers if isinstance(answer, dict)}
        for answer in answers:
            if not isinstance(answer, dict):
                logger.warning("engine %s call failed: %s: %s", method, type(answer).__name__, str(answer)[:200])
        return replicas, len(answers) - len(replicas)

