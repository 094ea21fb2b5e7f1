"""Reliability and security of the Serve app (issue 6): bad input, predictor faults, disconnects,
load, the starvation bound end to end, API keys and request fields that must not load anything.

Real Ray Serve + real vLLM (CPU) + the tiny random Llama; one app for the whole module. The heavier
drills (200 clients, 100 disconnects, killing an engine replica) live in benchmarks/fault_harness.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_serve import _assert_error, _free_port, _param, _set_predictor

MODEL_NAME = "tiny-llama"
API_KEY = "reliability-key-789"
MAX_NUM_SEQS = 4
MAX_MODEL_LEN = 512
MAX_TOKENS_CAP = 64
MAX_BODY_BYTES = 32 * 1024
STARVATION = {"threshold": 6, "quantum": 4}
PREDICTOR_TIMEOUT_S = 1.0
FINISH_REASONS = ("stop", "length", "tool_calls")


@dataclass
class RelApp:
    url: str
    model: str


@pytest.fixture(scope="module")
def rel_app() -> Iterator[RelApp]:
    """2 LTR engine replicas (small starvation threshold), the predictor app, an API-key ingress."""
    import ray
    from ray import serve

    from deployments.app import build_app, build_predictor_app
    from ltr.models import build_tiny_llama, cache_dir

    model = str(build_tiny_llama(cache_dir() / "models" / MODEL_NAME))
    port = _free_port()
    ray.init(address="local", _temp_dir=tempfile.mkdtemp(prefix="ltr-rel-test-"), include_dashboard=False,
             num_cpus=2, logging_level="WARNING", configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_predictor_app({"num_cpus": 0.25}), name="ltr-predictor", route_prefix=None)
        engine_kwargs = {"max_num_seqs": MAX_NUM_SEQS, "max_model_len": MAX_MODEL_LEN, "enforce_eager": True}
        serve.run(build_app({
            "model": model, "num_engine_replicas": 2, "engine_num_cpus": 0.5, "engine_kwargs": engine_kwargs,
            "policy": {"name": "ltr", "starvation": STARVATION}, "routing_stats_period_s": 0.5,
            # The ingress waits for each score here (the tiny model answers before a slow predictor would):
            # these tests hold its fallbacks and late scores; tests/test_overload.py holds the default, requests
            # sent ahead of their scores.
            "ingress": {"allow_score_override": True, "predictor_timeout_s": PREDICTOR_TIMEOUT_S,
                        "max_tokens_cap": MAX_TOKENS_CAP, "max_body_bytes": MAX_BODY_BYTES,
                        "breaker_failures": 3, "breaker_cooldown_s": 1.0, "send_before_score": False},
        }), name="rel", route_prefix="/")
        serve.run(build_app({
            "model": model, "engine_kwargs": engine_kwargs,
            "ingress": {"engine_app": "rel", "api_key_env": "LTR_REL_API_KEY", "predictor_app": None},
            "ingress_env": {"LTR_REL_API_KEY": API_KEY},
        }), name="rel-secure", route_prefix="/secure")
        yield RelApp(url=f"http://127.0.0.1:{port}", model=model)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(rel_app: RelApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rel_app.url, timeout=120) as http:
        yield http


def _ok_completion(client: httpx.Client, **extra: Any) -> dict:
    body = {"model": MODEL_NAME, "prompt": "Still serving?", "max_tokens": 4, **extra}
    response = client.post("/v1/completions", json=body, headers={"x-ltr-score-override": "1.0"})
    assert response.status_code == 200, response.text
    return response.json()


def _check_success(response: httpx.Response, streamed: bool) -> None:
    """A 200 answer is complete and well-formed (JSON object, or SSE ending in [DONE])."""
    if streamed:
        lines = [line for line in response.text.splitlines() if line]
        assert lines and lines[-1] == "data: [DONE]", response.text[-300:]
        events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert all("error" not in e for e in events), events
        finishes = [(c["index"], c["finish_reason"]) for e in events for c in e["choices"] if c["finish_reason"]]
        indexes = [index for index, _ in finishes]
        assert finishes and len(set(indexes)) == len(indexes), events   # one finish per choice (n may be > 1)
        assert all(reason in FINISH_REASONS for _, reason in finishes), events
    else:
        body = response.json()
        assert body["choices"] and all(c["finish_reason"] in FINISH_REASONS for c in body["choices"]), body
        assert body["usage"]["completion_tokens"] >= 0


async def _engine_stats(url: str) -> dict[str, dict]:
    """Debug stats of every engine replica (one call: the ingress broadcasts to the replicas)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        reply = await http.get("/v1/ltr/engine_stats")
    assert reply.status_code == 200, reply.text
    return reply.json()["replicas"]


# ---- 1. bad input ---------------------------------------------------------------------------------

#: Any JSON value (strings may hold lone surrogates: valid JSON escapes, invalid Unicode).
_JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                     | st.text(st.characters(exclude_categories=()), max_size=12),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=3),
                     max_leaves=6)
#: Fields a request might use to make a server load something; they must be ignored.
_LOADER_FIELDS = ["trust_remote_code", "tokenizer", "model_path", "download_dir", "chat_template", "lora_request"]


def _from_schema(schema: dict[str, Any]) -> st.SearchStrategy:
    """Values a (pydantic-generated, $defs-inlined) JSON schema admits, kept small for a tiny engine."""
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([_from_schema(option) for option in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object":
        props, required = schema.get("properties", {}), schema.get("required", [])
        return st.fixed_dictionaries({k: _from_schema(v) for k, v in props.items() if k in required},
                                     optional={k: _from_schema(v) for k, v in props.items() if k not in required})
    if kind == "array":
        return st.lists(_from_schema(schema.get("items", {})), min_size=max(schema.get("minItems", 0), 1),
                        max_size=2)
    if kind == "string":
        return st.text(min_size=1, max_size=20).filter(str.strip)
    if kind == "integer":
        return st.just(1) | st.integers(schema.get("minimum", 1), 6)  # token counts stay tiny; n must be 1
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0.0) + 0.01)
        return st.floats(low, schema.get("maximum", 2.0))
    if kind == "boolean":
        return st.booleans()
    return st.none()


def _edge(schema: dict[str, Any]) -> st.SearchStrategy:
    """Out-of-range, boundary and wrongly typed values for a field."""
    kind = schema.get("type") or next((o.get("type") for o in schema.get("anyOf", []) if o.get("type") != "null"),
                                      None)
    if kind == "integer":
        return st.sampled_from([-1, 0, 2**31, 2**63, 2**64, -(2**63) - 1, MAX_TOKENS_CAP + 1, 1.5, "3", True])
    if kind == "number":
        return st.sampled_from([-3.0, 3.0, 1e308, math.inf, -math.inf, math.nan, "0.5"])
    if kind == "string":
        return st.sampled_from(["", " ", "\ud800", "\x00", "\u202e"]) | _JUNK
    return _JUNK


@st.composite
def _fuzzed_body(draw: st.DrawFn, schema: dict[str, Any]) -> dict[str, Any]:
    """A valid body with 0-3 mutations: edge values, wrong types, missing fields, unknown keys."""
    body = draw(_from_schema(schema))
    body["model"] = MODEL_NAME
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 6)
    if "messages" in body:  # a conversation ends with the user's turn
        body["messages"][-1] = {"role": "user", "content": draw(st.text(min_size=1, max_size=20).filter(str.strip))}
    props = schema["properties"]
    for _ in range(draw(st.integers(0, 3))):
        mutation = draw(st.sampled_from(["edge", "junk", "drop", "extra"]))
        key = draw(st.sampled_from(sorted(props)))
        if mutation == "edge":
            body[key] = draw(_edge(props[key]))
        elif mutation == "junk":
            body[key] = draw(_JUNK)
        elif mutation == "drop":
            body.pop(key, None)
        else:
            body[draw(st.sampled_from(_LOADER_FIELDS) | st.text(min_size=1, max_size=8))] = draw(_JUNK)
    return body


@pytest.fixture(scope="module")
def openapi(client: httpx.Client) -> dict[str, Any]:
    """The live server's own schema: the fuzzer derives its bodies from what the API documents."""
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_openapi_documents_request_bodies(openapi: dict[str, Any]) -> None:
    # vLLM's own request models: `model` is optional there (the served model answers).
    for path, field in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        schema = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert {"model", field, "response_format", "logprobs", "n", "vllm_xargs"} <= set(schema["properties"])
        assert "$ref" not in json.dumps(schema)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_bodies_never_5xx(client: httpx.Client, openapi: dict[str, Any], data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    schema = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body = data.draw(_fuzzed_body(schema))
    raw = json.dumps(body, allow_nan=True).encode()  # Python's json emits NaN/Infinity; so do some clients
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    event(f"status {response.status_code}")
    assert response.status_code < 500, (body, response.status_code, response.text[:500])
    if response.status_code == 200:
        _check_success(response, streamed=body.get("stream") is True)
    else:
        _assert_error(response, response.status_code)


#: Status and named field as plain vLLM answers them (tests/test_differential.py checks that it does); the
#: ones vLLM's server accepts (no model name, a blank prompt, prompt + max_tokens over the context: vLLM
#: shortens the answer) moved out of this list when the ingress began to use vLLM's serving layer.
BAD_BODIES: list[tuple[str, bytes, int, str | None]] = [
    ("malformed json", b'{"model": "tiny-llama", "prompt": "hi"', 400, None),
    ("not an object", b'"just a string"', 400, None),
    ("empty body", b"", 400, None),
    ("invalid utf-8", b'{"model": "tiny-llama", "prompt": "caf\xc3\x28 \xff"}', 400, None),
    ("lone surrogate", b'{"model": "tiny-llama", "prompt": "\\ud800 hi", "max_tokens": 2}', 400, None),
    ("wrong prompt type", b'{"model": "tiny-llama", "prompt": 42}', 400, "prompt"),
    ("wrong max_tokens type", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": "eight"}', 400, "max_tokens"),
    ("max_tokens float", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 2.5}', 400, "max_tokens"),
    ("missing prompt", b'{"model": "tiny-llama"}', 400, "prompt"),
    ("null prompt", b'{"model": "tiny-llama", "prompt": null}', 400, "prompt"),
    ("empty prompt", b'{"model": "tiny-llama", "prompt": ""}', 400, "prompt"),
    ("zero max_tokens", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    ("negative max_tokens", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
    ("huge max_tokens", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 99999999999999999999}', 400,
     "max_tokens"),
    ("max_tokens over the cap", json.dumps({"model": MODEL_NAME, "prompt": "hi", "max_tokens": MAX_TOKENS_CAP + 1}
                                           ).encode(), 400, "max_tokens"),
    ("prompt longer than context", json.dumps({"model": MODEL_NAME, "prompt": "word " * 2 * MAX_MODEL_LEN}).encode(),
     400, "input_tokens"),
    ("NaN temperature", b'{"model": "tiny-llama", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("infinite top_p", b'{"model": "tiny-llama", "prompt": "hi", "top_p": Infinity}', 400, "top_p"),
    ("huge seed", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 2, "seed": 100000000000000000000000}',
     400, "seed"),
    ("empty stop string", b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 2, "stop": [""]}', 400, None),
    ("unknown model", b'{"model": "gpt-4o", "prompt": "hi"}', 404, "model"),
    ("model as a path", b'{"model": "/etc/passwd", "prompt": "hi"}', 404, "model"),
    ("deeply nested", b'{"model": "tiny-llama", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
]


@pytest.mark.parametrize("name,raw,status,param", BAD_BODIES, ids=[case[0] for case in BAD_BODIES])
def test_bad_completion_bodies(client: httpx.Client, name: str, raw: bytes, status: int, param: str | None) -> None:
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    error = _assert_error(response, status)
    if param is not None:  # a union field may name its branch too ("prompt.str")
        assert (_param(error) or "").split(".")[0] == param, error


def test_bad_chat_bodies_and_oversized(client: httpx.Client) -> None:
    # (vLLM's server accepts a message without content and a conversation of one assistant message.)
    for body in ({"model": MODEL_NAME, "messages": "hi"},
                 {"model": MODEL_NAME, "messages": []},
                 {"model": MODEL_NAME, "messages": [{"role": "user", "content": 7}]},
                 {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                  "image_url": "file:///etc"}]}]},
                 {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
                 {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}):
        _assert_error(client.post("/v1/chat/completions", json=body), 400)
    big = {"model": MODEL_NAME, "prompt": "x" * (MAX_BODY_BYTES + 10)}
    headers = {"content-type": "application/json"}
    _assert_error(client.post("/v1/completions", content=json.dumps(big), headers=headers), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap is enforced while reading
        yield b'{"model": "tiny-llama", "prompt": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'

    _assert_error(client.post("/v1/completions", content=chunks(), headers=headers), 413)
    # A declared length over the cap is refused before the body arrives.
    host, port = client.base_url.host, client.base_url.port
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 999999999999\r\n\r\n{\"model\": ")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            piece = sock.recv(4096)
            if not piece:
                break
            reply += piece
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 413
    _ok_completion(client)


# ---- 7. security ----------------------------------------------------------------------------------

def test_api_key_mode(client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                    {"Authorization": API_KEY}, {"Authorization": f"Bearer {API_KEY}x"},
                    {"x-api-key": API_KEY}):
        error = _assert_error(client.post("/secure/v1/completions", json=body, headers=headers), 401)
        assert error["type"] == "AuthenticationError"
    for path in ("/secure/v1/models", "/secure/v1/ltr/stats", "/secure/v1/ltr/engine_stats", "/secure/metrics"):
        _assert_error(client.get(path), 401)
    _assert_error(client.post(f"/secure/v1/completions?api_key={API_KEY}", json=body), 401)
    good = {"Authorization": f"Bearer {API_KEY}"}
    response = client.post("/secure/v1/completions", json=body, headers=good)
    assert response.status_code == 200, response.text
    assert client.get("/secure/v1/models", headers=good).status_code == 200
    assert client.get("/secure/metrics", headers=good).status_code == 200
    assert client.get("/secure/health").status_code == 200  # liveness stays open for load balancers
    # The secure ingress does not trust client-supplied scores.
    _assert_error(client.post("/secure/v1/completions", json=body,
                              headers={**good, "x-ltr-score-override": "0.1"}), 400)


@pytest.fixture
def trap_model(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose remote code would leave a marker file if anything imported it."""
    marker = tmp_path / "remote-code-ran"
    folder = tmp_path / "evil-model"
    folder.mkdir()
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM",
                     "AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer",
                                                                                          None]}}))
    return folder, marker


def test_request_fields_cannot_load_code_or_files(client: httpx.Client, trap_model: tuple[Path, Path]) -> None:
    folder, marker = trap_model
    sneaky = {"trust_remote_code": True, "tokenizer": str(folder), "model_path": str(folder),
              "download_dir": str(folder), "revision": "main", "lora_request": {"lora_path": str(folder)},
              "guided_grammar": str(folder)}
    # The model is fixed by config: a path (even with trust_remote_code) is an unknown model.
    for model in (str(folder), f"{folder}/", "file://" + str(folder), "../" * 8 + str(folder)):
        _assert_error(client.post("/v1/completions", json={"model": model, "prompt": "hi", **sneaky}), 404)
    # With the served name, the loader-facing fields are ignored and the configured model answers.
    completion = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3,
                                                      **sneaky})
    assert completion.status_code == 200, completion.text
    assert completion.json()["model"] == MODEL_NAME
    chat = client.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **sneaky})
    assert chat.status_code == 200, chat.text
    # A request's own chat template is refused, as vLLM's server refuses it unless the operator trusts it
    # (`trust_request_chat_template`); before the serving layer moved to vLLM's, the field was ignored.
    for template in ("{{ open('/etc/passwd') }}", "{% for m in messages %}{{ m.content }}{% endfor %}"):
        refused = client.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "chat_template": template})
        assert "trust-request-chat-template" in _assert_error(refused, 400)["message"]
    assert not marker.exists()
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL_NAME]


# ---- 5. load: nothing lost or duplicated ------------------------------------------------------------

def test_concurrent_clients_nothing_lost_or_duplicated(rel_app: RelApp) -> None:
    clients, max_tokens = 48, 6

    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, str, int, str]:
        stream = i % 2 == 0
        body = {"model": MODEL_NAME, "prompt": f"Client {i} says", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": stream}
        if stream:   # vLLM refuses stream_options on a non-streamed request (400)
            body["stream_options"] = {"include_usage": True}
        response = await http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        _check_success(response, streamed=stream)
        if stream:
            events = [json.loads(line.removeprefix("data: ")) for line in response.text.splitlines()
                      if line.startswith("data: {")]
            ids = {e["id"] for e in events}
            assert len(ids) == 1
            return i, ids.pop(), events[-1]["usage"]["completion_tokens"], response.headers["x-ltr-replica"]
        body = response.json()
        return i, body["id"], body["usage"]["completion_tokens"], response.headers["x-ltr-replica"]

    async def run() -> tuple[list, dict, dict]:
        before = await _engine_stats(rel_app.url)
        async with httpx.AsyncClient(base_url=rel_app.url, timeout=120,
                                     limits=httpx.Limits(max_connections=clients)) as http:
            results = await asyncio.gather(*[one(http, i) for i in range(clients)])
        return results, before, await _engine_stats(rel_app.url)

    results, before, after = asyncio.run(run())
    assert sorted(r[0] for r in results) == list(range(clients))          # none lost
    assert len({r[1] for r in results}) == clients                         # no id served twice
    assert all(r[2] == max_tokens for r in results)                        # every answer complete
    assert set(before) == set(after) and len(after) == 2
    engine_requests = sum(after[r]["counters"]["requests"] - before[r]["counters"]["requests"] for r in after)
    assert engine_requests == clients                                       # no duplicate engine work


# ---- 4. disconnects -----------------------------------------------------------------------------------

def test_disconnects_leave_engine_idle(rel_app: RelApp, client: httpx.Client) -> None:
    clients = 24

    async def drop(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": MODEL_NAME, "prompt": f"Long story {i}", "max_tokens": MAX_TOKENS_CAP, "ignore_eos": True,
                "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    break  # one chunk, then hang up mid-stream

    async def run() -> tuple[dict, dict]:
        before = await _engine_stats(rel_app.url)
        async with httpx.AsyncClient(base_url=rel_app.url, timeout=120,
                                     limits=httpx.Limits(max_connections=clients)) as http:
            await asyncio.gather(*[drop(http, i) for i in range(clients)])
        deadline = time.monotonic() + 90
        while True:
            after = await _engine_stats(rel_app.url)
            idle = len(after) == 2 and all(
                s["in_flight"] == 0 and s["engine_core"].get("running") == 0 and s["engine_core"].get("waiting") == 0
                and s["engine_core"].get("kv_cache_usage") == 0.0 for s in after.values())
            if idle or time.monotonic() > deadline:
                return before, after
            await asyncio.sleep(0.5)

    before, after = asyncio.run(run())
    for stats in after.values():
        assert stats["in_flight"] == 0, stats
        assert stats["engine_core"]["running"] == 0 and stats["engine_core"]["waiting"] == 0, stats
        assert stats["engine_core"]["kv_cache_usage"] == 0.0, stats
    aborted = sum(after[r]["counters"]["aborted"] - before[r]["counters"]["aborted"] for r in after)
    finished_early = sum(after[r]["counters"]["requests"] - before[r]["counters"]["requests"] for r in after) - aborted
    assert aborted >= clients - MAX_NUM_SEQS, (aborted, finished_early)
    _ok_completion(client)


# ---- 6. starvation bound end to end ------------------------------------------------------------------

def test_long_request_finishes_within_starvation_bound(rel_app: RelApp) -> None:
    """A long, worst-ranked request amid a sustained stream of short ones still finishes.

    Aging promotes a request unscheduled for `threshold` steps for `quantum` steps, so a request of
    `long_tokens` output tokens needs at most ceil(long_tokens / quantum) such cycles of at most
    threshold + quantum + 1 steps. In that many steps a replica with MAX_NUM_SEQS seats completes at most
    steps * MAX_NUM_SEQS / short_tokens short requests (+ those already running or in transit). Without
    aging the long request would wait behind every short one the clients keep sending.
    """
    long_tokens, short_tokens, short_clients, max_shorts = 12, 16, 20, 240
    cycles = math.ceil(long_tokens / STARVATION["quantum"])
    bound_steps = cycles * (STARVATION["threshold"] + STARVATION["quantum"] + 1)
    short_bound = math.ceil(bound_steps * MAX_NUM_SEQS / short_tokens) + 2 * MAX_NUM_SEQS
    short_headers = {"x-ltr-score-override": "0.1", "x-ltr-expected-tokens-override": str(short_tokens)}
    long_headers = {"x-ltr-score-override": "9.0", "x-ltr-expected-tokens-override": str(short_tokens)}

    async def run() -> tuple[dict, list[dict], int]:
        shorts: list[dict] = []
        sent = 0
        long_done = asyncio.Event()
        long_result: dict = {}

        async def short_client(http: httpx.AsyncClient) -> None:
            nonlocal sent
            while sent < max_shorts and not long_done.is_set():
                sent += 1
                start = time.monotonic()
                response = await http.post("/v1/completions", headers=short_headers, json={
                    "model": MODEL_NAME, "prompt": f"Short {sent}", "max_tokens": short_tokens, "ignore_eos": True})
                assert response.status_code == 200, response.text
                shorts.append({"sent": start, "done": time.monotonic(), "replica": response.headers["x-ltr-replica"]})

        async def long_client(http: httpx.AsyncClient) -> None:
            while len(shorts) < 2 * short_clients:  # the stream is sustained before the long one arrives
                await asyncio.sleep(0.05)
            long_result["sent"] = time.monotonic()
            response = await http.post("/v1/completions", headers=long_headers, json={
                "model": MODEL_NAME, "prompt": "A long answer", "max_tokens": long_tokens, "ignore_eos": True})
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == long_tokens
            long_result.update(done=time.monotonic(), replica=response.headers["x-ltr-replica"], shorts_sent=sent)
            long_done.set()

        async with httpx.AsyncClient(base_url=rel_app.url, timeout=300,
                                     limits=httpx.Limits(max_connections=short_clients + 2)) as http:
            await asyncio.gather(long_client(http), *[short_client(http) for _ in range(short_clients)])
        return long_result, shorts, sent

    long_result, shorts, sent = asyncio.run(run())
    assert long_result["shorts_sent"] < max_shorts, "the long request only finished once the stream stopped"
    overtaking = [s for s in shorts if s["replica"] == long_result["replica"]
                  and s["sent"] > long_result["sent"] and s["done"] < long_result["done"]]
    assert len(overtaking) <= short_bound, (len(overtaking), short_bound)
    stats = asyncio.run(_engine_stats(rel_app.url))
    assert stats[long_result["replica"]]["scheduler"]["promotions"] >= 1, stats[long_result["replica"]]


# ---- 2. predictor faults -----------------------------------------------------------------------------

@pytest.mark.parametrize("fault,reasons", [
    ({"fault": "raise"}, {"error", "circuit_open"}),
    ({"fault": "hang", "hang_s": 20.0}, {"timeout", "circuit_open"}),
    (None, {"error", "timeout", "circuit_open"}),
], ids=["raising", "hanging", "absent"])
def test_predictor_faults_place_requests_at_the_neutral_score(rel_app: RelApp, client: httpx.Client, fault: dict | None,
                                            reasons: set[str]) -> None:
    try:
        _set_predictor(fault)
        stats_before = client.get("/v1/ltr/stats").json()
        before = stats_before["predictor_fallbacks"]
        engines_before = asyncio.run(_engine_stats(rel_app.url))
        for i in range(4):
            response = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": f"No score {i}",
                                                             "max_tokens": 3})
            assert response.status_code == 200, response.text
            float(response.headers["x-ltr-score"])   # a score, not "none": not ahead of ranked work
            assert response.headers["x-ltr-placement"] == "neutral"
            assert response.headers["x-ltr-fallback"] in reasons
        stats_after = client.get("/v1/ltr/stats").json()
        after = stats_after["predictor_fallbacks"]
        engines_after = asyncio.run(_engine_stats(rel_app.url))
    finally:
        _set_predictor({})
    moved = sum(after.get(r, 0) - before.get(r, 0) for r in reasons)
    assert moved == 4, (before, after)
    assert stats_after["neutral_placements"] - stats_before["neutral_placements"] == 4
    counters = {key: sum(engines_after[r]["counters"][key] - engines_before[r]["counters"][key]
                         for r in engines_after) for key in ("scored", "unscored")}
    # The engines ranked them by the neutral score: none reached the scheduler unscored (= first in line).
    assert counters == {"scored": 4, "unscored": 0}


def test_late_predictions_re_rank_requests_in_the_engine(rel_app: RelApp, client: httpx.Client) -> None:
    # The predictor answers, but only after the ingress stopped waiting: each of 24 requests (3 waves on
    # the 8 seats) goes on at the neutral score, and its engine replica re-ranks it when the score lands.
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=rel_app.url, timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json={
                "model": MODEL_NAME, "prompt": f"Late score {i}", "max_tokens": MAX_TOKENS_CAP,
                "ignore_eos": True}) for i in range(24)))

    try:
        _set_predictor({"fault": "hang", "hang_s": PREDICTOR_TIMEOUT_S + 0.3})
        engines_before = asyncio.run(_engine_stats(rel_app.url))
        responses = asyncio.run(burst())
        engines_after = asyncio.run(_engine_stats(rel_app.url))
    finally:
        _set_predictor({})
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    timed_out = [r for r in responses if r.headers.get("x-ltr-fallback") == "timeout"]
    assert timed_out and all(r.headers["x-ltr-placement"] == "neutral" for r in timed_out)

    def moved(section: str) -> int:
        return sum(engines_after[r][section].get("late_scores", 0) - engines_before[r][section].get("late_scores", 0)
                   for r in engines_after)

    # Replicas received late scores for requests still in flight, and their schedulers applied them.
    assert moved("counters") >= 1 and moved("scheduler") >= 1, (engines_before, engines_after)
