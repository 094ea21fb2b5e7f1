"""The Ray Serve application end to end: real Ray Serve, real vLLM (CPU), tiny random Llama.

One local Ray + Serve instance for the whole module: the serving app (2 engine replicas, rank
scheduler, least-work router, streams batched every 200 ms), the predictor app, and an API-key ingress
sharing the same engines.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from ltr.scheduling.policy import PolicyConfig

MODEL_NAME = "tiny-llama"
API_KEY = "test-key-123"
#: Generation requests the API-key ingress holds at once (back-pressure test).
QUEUE_BOUND = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def serve_app() -> Iterator[dict]:
    import ray
    from ray import serve

    from deployments.app import build_app, build_predictor_app
    from ltr.models import build_tiny_llama, cache_dir

    model = str(build_tiny_llama(cache_dir() / "models" / MODEL_NAME))
    temp_dir = tempfile.mkdtemp(prefix="ltr-serve-test-")
    port = _free_port()
    ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False, num_cpus=2,
             logging_level="WARNING", configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_predictor_app({"num_cpus": 0.25}), name="ltr-predictor", route_prefix=None)
        engine_kwargs = {"max_num_seqs": 8, "max_model_len": 1024, "enforce_eager": True}
        serve.run(build_app({
            "model": model, "num_engine_replicas": 2, "engine_num_cpus": 0.5, "engine_kwargs": engine_kwargs,
            "routing_stats_period_s": 0.5, "stream_batch_ms": 200,   # streams cross in batched messages
            "ingress": {"allow_score_override": True, "predictor_timeout_s": 5.0, "max_tokens_cap": 512,
                        "max_body_bytes": 64 * 1024, "breaker_cooldown_s": 1.0},
        }), name="ltr", route_prefix="/")
        serve.run(build_app({
            "model": model, "engine_kwargs": engine_kwargs,
            "ingress": {"engine_app": "ltr", "api_key_env": "LTR_TEST_API_KEY", "predictor_app": None,
                        "max_queued_requests": QUEUE_BOUND, "retry_after_s": 2},
            "ingress_env": {"LTR_TEST_API_KEY": API_KEY},
        }), name="ltr-secure", route_prefix="/secure")
        yield {"url": f"http://127.0.0.1:{port}", "model": model}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(serve_app: dict) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve_app["url"], timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def tokenizer(serve_app: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(serve_app["model"])


def _completion(client: httpx.Client, prompt: str = "Tell me a story about", max_tokens: int = 12,
                headers: dict | None = None, **extra) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body, headers=headers or {})


def _assert_error(response: httpx.Response, status: int) -> dict:
    """An error in vLLM's shape (`{"error": {"message", "type", "param", "code": <status>}}`)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, error
    return error


def _param(error: dict) -> str | None:
    """The field an error names (vLLM's validation errors say `body.<field>`, its own checks `<field>`)."""
    return None if error["param"] is None else error["param"].removeprefix("body.")


# ---- the OpenAI surface over HTTP ---------------------------------------------------------------------

def test_health_and_models(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]


def test_completion_counts_usage(client: httpx.Client, tokenizer) -> None:
    prompt = "The quick brown fox"
    response = _completion(client, prompt, max_tokens=10, ignore_eos=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL_NAME
    assert body["choices"][0]["finish_reason"] == "length"
    assert isinstance(body["choices"][0]["text"], str)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tokenizer(prompt).input_ids)
    assert usage["completion_tokens"] == 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + 10
    assert response.headers["x-ltr-replica"]
    assert "x-ltr-score" in response.headers


def test_chat_applies_template(client: httpx.Client, tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    response = client.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert body["usage"]["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    assert body["usage"]["completion_tokens"] == 8


def test_streaming_sse_matches_plain(client: httpx.Client) -> None:
    plain = _completion(client, "Once upon a time", max_tokens=16, ignore_eos=True).json()
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == plain["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 16


def test_openai_client_plain_and_streaming(serve_app: dict) -> None:
    oai = openai.OpenAI(base_url=serve_app["url"] + "/v1", api_key="unused", max_retries=0)
    completion = oai.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 6
    chat = oai.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    stream = oai.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=6, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [m.id for m in oai.models.list().data] == [MODEL_NAME]


# ---- routing, scheduling, predictor ------------------------------------------------------------------

def test_both_replicas_receive_traffic(serve_app: dict) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=serve_app["url"], timeout=120) as http:
            return await asyncio.gather(*[
                http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": f"Request {i}",
                                                   "max_tokens": 48, "ignore_eos": True})
                for i in range(12)])

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    replicas = {r.headers["x-ltr-replica"] for r in responses}
    assert len(replicas) == 2, replicas


def _burst_while_one_replica_holds(url: str, held_tokens: int, count: int, burst_tokens: int) -> tuple[str, list[str]]:
    """`count` concurrent short requests, each predicted at `burst_tokens`, sent while one replica streams a
    request predicted at `held_tokens`: that replica, and the replica each short one went to."""
    long_body = {"model": MODEL_NAME, "prompt": "A long essay", "max_tokens": min(held_tokens, 500),
                 "ignore_eos": True, "stream": True}
    long_headers = {"x-ltr-score-override": "9.0", "x-ltr-expected-tokens-override": str(held_tokens)}
    short_headers = {"x-ltr-score-override": "0.1", "x-ltr-expected-tokens-override": str(burst_tokens)}

    async def scenario() -> tuple[str, list[str]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            async with http.stream("POST", "/v1/completions", json=long_body, headers=long_headers) as long_run:
                assert long_run.status_code == 200
                busy = long_run.headers["x-ltr-replica"]
                short = await asyncio.gather(*[
                    http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": f"Short {i}", "max_tokens": 2},
                              headers=short_headers)
                    for i in range(count)])
                assert all(r.status_code == 200 for r in short)
                async for _ in long_run.aiter_lines():
                    pass
            return busy, [r.headers["x-ltr-replica"] for r in short]

    return asyncio.run(scenario())


def test_least_work_router_avoids_the_replica_holding_long_work(serve_app: dict) -> None:
    """While one replica holds a request predicted to be huge, short requests all go to the other."""
    busy, short_replicas = _burst_while_one_replica_holds(serve_app["url"], 100000, 6, 2)
    assert busy not in short_replicas, (busy, short_replicas)
    assert len(set(short_replicas)) == 1


def test_a_burst_is_spread_by_predicted_work_not_sent_to_the_idle_replica(serve_app: dict) -> None:
    """A burst is routed before any replica has accepted its requests: each choice must count the ones before
    it, else every request of the burst sees the same loads and all go to the replica that looked idlest."""
    busy, burst_replicas = _burst_while_one_replica_holds(serve_app["url"], 300, 10, 60)
    # 10 x 60 predicted tokens against 300 held: the idle replica takes about six, the busy one the rest.
    assert 1 <= burst_replicas.count(busy) <= len(burst_replicas) / 2, (busy, burst_replicas)


def _scheduler_totals(client: httpx.Client) -> dict[str, dict]:
    """Latest debug stats per engine replica, from the ingress's debug route (one broadcast)."""
    response = client.get("/v1/ltr/engine_stats")
    assert response.status_code == 200, response.text
    return response.json()["replicas"]


def test_engine_stats_covers_every_replica_in_one_call(client: httpx.Client) -> None:
    # Through the router, every idle-time call would go to the same replica; the broadcast reaches each.
    for _ in range(3):
        per_replica = _scheduler_totals(client)
        assert len(per_replica) == 2, sorted(per_replica)
        assert all(stats["replica"] == replica for replica, stats in per_replica.items())


def test_metrics_expose_every_replica_in_prometheus_format(client: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    assert _completion(client, "Metrics").status_code == 200
    engines = _scheduler_totals(client)
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert families["ltr_engine_requests"].type == "counter"
    in_flight = families["ltr_engine_in_flight_requests"]
    assert in_flight.type == "gauge"
    assert {s.labels["replica"] for s in in_flight.samples} == set(engines)
    received = {s.labels["replica"]: s.value for s in families["ltr_engine_requests"].samples}
    assert received == {r: float(stats["counters"]["requests"]) for r, stats in engines.items()}
    assert sum(s.value for s in families["ltr_ingress_requests"].samples) >= 1
    assert len({s.labels["ingress"] for s in families["ltr_ingress_requests"].samples}) == 1
    # vLLM's own metrics, per engine replica, beside ours.
    ttft = families["vllm:time_to_first_token_seconds"]
    assert ttft.type == "histogram" and {s.labels["replica"] for s in ttft.samples} == set(engines)
    assert {s.labels["replica"] for s in families["vllm:num_requests_running"].samples} == set(engines)
    generated = {s.labels["replica"]: s.value for s in families["vllm:generation_tokens"].samples
                 if s.name.endswith("_total")}
    assert sum(generated.values()) >= 1, generated
    assert families["ltr_metrics_scrape_failures"].samples[0].value == 0


def test_score_reaches_engine_scheduler(client: httpx.Client) -> None:
    # The rank scheduler runs in the engine-core process and dumps its counters to a file: every 50
    # steps, and whenever the engine runs out of requests. So once the replica is idle the file is exact:
    # one more scored request, nothing running. (A periodic dump during the request would show it running.)
    before = {r: s["scheduler"].get("scored_requests", 0) for r, s in _scheduler_totals(client).items()}
    response = _completion(client, "Scored request", max_tokens=16, ignore_eos=True,
                           headers={"x-ltr-score-override": "2.5"})
    assert response.status_code == 200
    assert response.headers["x-ltr-score"] == "2.5"
    assert response.headers["x-ltr-fallback"] == "override"
    replica = response.headers["x-ltr-replica"]
    deadline = time.monotonic() + 30
    while True:
        stats = _scheduler_totals(client)[replica]
        scheduler = stats["scheduler"]
        settled = stats["in_flight"] == 0 and scheduler.get("running") == 0 and scheduler.get("waiting") == 0
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert settled, scheduler
    assert scheduler["scored_requests"] == before.get(replica, 0) + 1, (before, scheduler)
    default = PolicyConfig().name   # the app runs the default policy
    assert stats["policy"] == default and scheduler["policy"]["name"] == default
    assert stats["counters"]["scored"] > 0


def test_client_disconnect_aborts_in_engine(serve_app: dict, client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "A very long answer", "max_tokens": 500, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=serve_app["url"], timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        per_replica = _scheduler_totals(client)
        if len(per_replica) == 2 and all(s["in_flight"] == 0 for s in per_replica.values()):
            break
        time.sleep(0.5)
    assert all(s["in_flight"] == 0 for s in per_replica.values())
    assert sum(s["counters"]["aborted"] for s in per_replica.values()) >= 1


def _set_predictor(settings: dict | None) -> None:
    from ray import serve

    from deployments.app import build_predictor_app

    if settings is None:
        serve.delete("ltr-predictor")
    else:
        serve.run(build_predictor_app({"num_cpus": 0.25, "settings": settings}), name="ltr-predictor",
                  route_prefix=None)


def test_predictor_failing_or_removed_requests_still_succeed(client: httpx.Client) -> None:
    from ltr.predictor.model import shipped_artifact_dir

    try:
        _set_predictor({"fault": "raise"})
        response = _completion(client, "Predictor is failing")
        assert response.status_code == 200, response.text
        # Not ahead of ranked work: placed at the neutral score (median of recent predictions).
        float(response.headers["x-ltr-score"])
        assert response.headers["x-ltr-placement"] == "neutral"
        assert response.headers["x-ltr-fallback"] in ("error", "circuit_open")

        _set_predictor(None)
        for _ in range(4):
            response = _completion(client, "Predictor is gone")
            assert response.status_code == 200, response.text
            assert response.headers["x-ltr-placement"] == "neutral"
        stats = client.get("/v1/ltr/stats").json()
        assert stats["predictor_fallbacks"].get("error", 0) + stats["predictor_fallbacks"].get("timeout", 0) >= 1
    finally:
        _set_predictor({})
    # Back: once the breaker closes the predictor is used again (or reports it has no artifact).
    expected = None if (shipped_artifact_dir() / "config.json").is_file() else "unavailable"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = _completion(client, "Predictor is back")
        assert response.status_code == 200
        if response.headers.get("x-ltr-fallback") == expected:
            break
        time.sleep(0.5)
    assert response.headers.get("x-ltr-fallback") == expected


# ---- bad input and auth ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,param", [
    ({"model": MODEL_NAME}, 400, "prompt"),
    ({"model": MODEL_NAME, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": "hi", "temperature": 9}, 400, "temperature"),
    ({"model": MODEL_NAME, "prompt": "hi", "n": 2, "temperature": 0}, 400, None),   # vLLM: n > 1 needs sampling
    ({"model": MODEL_NAME, "prompt": "word " * 1100}, 400, "input_tokens"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
])
def test_invalid_completion_requests(client: httpx.Client, body: dict, status: int, param: str | None) -> None:
    error = _assert_error(client.post("/v1/completions", json=body), status)
    assert _param(error) == param


def test_fields_vllm_serves_are_served(client: httpx.Client) -> None:
    """What the old ingress refused or ignored: vLLM's serving layer honors it (tests/test_differential.py
    compares each with plain vLLM)."""
    two = _completion(client, "Two answers", max_tokens=4, n=2, temperature=1.0, seed=1)
    assert two.status_code == 200, two.text
    assert [c["index"] for c in two.json()["choices"]] == [0, 1]
    batch = _completion(client, ["first", "second"], max_tokens=3)
    assert batch.status_code == 200 and len(batch.json()["choices"]) == 2
    logprobs = client.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
        "ignore_eos": True, "logprobs": True, "top_logprobs": 2})
    assert logprobs.status_code == 200, logprobs.text
    content = logprobs.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(token["top_logprobs"]) == 2 for token in content)
    choice = client.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Pick"}], "max_tokens": 8,
        "structured_outputs": {"choice": ["alpha", "beta"]}})
    assert choice.status_code == 200 and choice.json()["choices"][0]["message"]["content"] in ("alpha", "beta")
    # No model name: vLLM serves its (only) model.
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_back_pressure_answers_429_with_retry_after(serve_app: dict, client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "Hold a seat", "max_tokens": 200, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def scenario() -> tuple[list[int], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=serve_app["url"], timeout=120) as http:
            held = []
            for _ in range(QUEUE_BOUND):
                stream = await http.send(http.build_request("POST", "/secure/v1/completions", json=body,
                                                            headers=headers), stream=True)
                held.append(stream)
            refused = await asyncio.gather(*[http.post("/secure/v1/completions", json=body, headers=headers)
                                             for _ in range(3)])
            statuses = [r.status_code for r in held]
            for stream in held:
                await stream.aclose()
            return statuses, refused

    statuses, refused = asyncio.run(scenario())
    assert statuses == [200] * QUEUE_BOUND
    for response in refused:
        _assert_error(response, 429)
        assert response.headers["retry-after"] == "2"
    # The seats come back when those streams end.
    deadline = time.monotonic() + 30
    while True:
        again = client.post("/secure/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2},
                            headers=headers)
        if again.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert again.status_code == 200, again.text


def test_malformed_bodies_and_routes(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    assert "JSON decode error" in _assert_error(client.post("/v1/completions", content=b"{not json",
                                                            headers=headers), 400)["message"]
    _assert_error(client.post("/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers=headers), 400)
    _assert_error(client.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    big = json.dumps({"model": MODEL_NAME, "prompt": "x" * (70 * 1024)})
    assert "exceeds" in _assert_error(client.post("/v1/completions", content=big, headers=headers), 413)["message"]
    _assert_error(client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": []}), 400)
    _assert_error(client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": "hi"}), 400)
    _assert_error(client.post("/v1/completions", content=b'{"model": "tiny-llama", "prompt": "hi"}'), 400)  # no JSON type
    _assert_error(client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi"},
                              headers={"x-ltr-score-override": "abc"}), 400)
    _assert_error(client.get("/v1/completions"), 405)
    _assert_error(client.get("/v1/nothing-here"), 404)
    # ...and the service still answers.
    assert _completion(client).status_code == 200


def test_api_key_mode(serve_app: dict, client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4}
    assert _assert_error(client.post("/secure/v1/completions", json=body), 401)["type"] == "AuthenticationError"
    _assert_error(client.post("/secure/v1/completions", json=body,
                              headers={"Authorization": "Bearer wrong"}), 401)
    _assert_error(client.get("/secure/v1/models"), 401)
    ok = client.post("/secure/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200, ok.text
    oai = openai.OpenAI(base_url=serve_app["url"] + "/secure/v1", api_key=API_KEY, max_retries=0)
    assert oai.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=3).usage.completion_tokens <= 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=serve_app["url"] + "/secure/v1", api_key="nope", max_retries=0).models.list()
