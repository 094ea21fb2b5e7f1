"""ltr-serve against plain vLLM: the same requests to `python -m vllm.entrypoints.openai.api_server` and to
the Serve app, on the tiny random Llama with the same engine settings.

Every field vLLM's server honors must be honored the same way (same status, same error type and named
field, the same greedy or seeded output token for token, logprobs included) and every request it refuses
must be refused the same way. The exceptions are ours by design and are checked as such: the output cap
(`max_tokens_cap`, 400 where vLLM would shorten the answer silently; both servers get the same cap as
vLLM's `override_generation_config` so nothing else differs), and error bodies where vLLM's server answers
FastAPI's bare `{"detail": ...}` (unparseable bodies): ltr-serve answers the same status as an error object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from test_serve import _free_port

MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 8
#: Both servers: vLLM's server-wide output cap (ltr-serve: `max_tokens_cap`, which also refuses more).
CAP = 256
#: Both servers: compact JSON from guided decoding (a random model would otherwise emit whitespace forever).
STRUCTURED = {"backend": "xgrammar", "disable_any_whitespace": True}
#: Fields that differ between any two answers (ids, clocks).
VOLATILE = {"id", "created", "system_fingerprint"}


def _engine_kwargs() -> dict[str, Any]:
    """The engine settings of both servers: the project's CPU defaults at this test's size."""
    from ltr.scheduling.engine import CPU_ENGINE_DEFAULTS

    return {**CPU_ENGINE_DEFAULTS, "max_num_seqs": MAX_NUM_SEQS, "max_model_len": MAX_MODEL_LEN,
            "enforce_eager": True, "structured_outputs_config": STRUCTURED}


def _cli_flags(kwargs: dict[str, Any]) -> list[str]:
    """`vllm serve` flags for engine keyword arguments (booleans as --x / --no-x, mappings as JSON)."""
    flags: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"plain vLLM server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


@pytest.fixture(scope="module")
def tiny_model() -> str:
    from ltr.models import build_tiny_llama, cache_dir

    return str(build_tiny_llama(cache_dir() / "models" / MODEL_NAME))


@pytest.fixture(scope="module")
def plain_vllm(tiny_model: str) -> Iterator[str]:
    """Plain vLLM's OpenAI server (a subprocess), the reference."""
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="plain-vllm-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
               "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--override-generation-config", json.dumps({"max_new_tokens": CAP}),
               *_cli_flags(_engine_kwargs())]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, Path(log.name), 600)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        Path(log.name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def ltr_serve(tiny_model: str, plain_vllm: str) -> Iterator[str]:
    """ltr-serve on the same model and engine settings: one engine replica, the rank scheduler, no predictor
    (scores come from the override header, so ranked and unranked requests both get compared)."""
    import ray
    from ray import serve

    from deployments.app import build_app

    port = _free_port()
    ray.init(address="local", _temp_dir=tempfile.mkdtemp(prefix="ltr-diff-test-"), include_dashboard=False,
             num_cpus=2, logging_level="WARNING", configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({
            "model": tiny_model, "served_model_name": MODEL_NAME, "num_engine_replicas": 1, "engine_num_cpus": 0.5,
            "engine_kwargs": _engine_kwargs(),
            "ingress": {"predictor_app": None, "max_tokens_cap": CAP, "allow_score_override": True},
        }), name="ltr", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def servers(plain_vllm: str, ltr_serve: str) -> Iterator[dict[str, httpx.Client]]:
    with httpx.Client(base_url=plain_vllm, timeout=120) as plain, httpx.Client(base_url=ltr_serve, timeout=120) as ours:
        yield {"vllm": plain, "ltr": ours}


def _stable(value: Any) -> Any:
    """An answer without the fields that differ between any two answers."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _events(text: str) -> list[Any]:
    lines = [line for line in text.splitlines() if line]
    assert lines and lines[-1] == "data: [DONE]", text[-300:]
    assert all(line.startswith("data: ") for line in lines), text[:300]
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Fold one chunk's fields into the stream so far: text is appended, lists extended, dicts merged."""
    for key, value in part.items():
        if value is None:
            continue
        if isinstance(value, str) and isinstance(into.get(key), str):
            into[key] += value
        elif isinstance(value, list):
            into.setdefault(key, []).extend(value)
        elif isinstance(value, dict):
            _merge(into.setdefault(key, {}), value)
        else:
            into[key] = value


def _stream_content(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What a stream says, without where it was cut into chunks: per choice the text, logprobs and finish
    reason in order, the last usage, and the per-chunk fields. vLLM sends what one engine step produced
    since the last chunk, so on a loaded machine two tokens can share a chunk (seen once in CI)."""
    choices: dict[int, dict[str, Any]] = {}
    usage, fields = None, set()
    for event in _stable(events):
        fields |= {(k, json.dumps(v)) for k, v in event.items() if k not in ("choices", "usage")}
        usage = event.get("usage") or usage
        for choice in event["choices"]:
            _merge(choices.setdefault(choice["index"], {}), choice)
    return {"choices": choices, "usage": usage, "fields": sorted(fields)}


def _send(client: httpx.Client, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=raw, headers={"content-type": "application/json", **(headers or {})})


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi there, who are you?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
                                                  "sure": {"type": "boolean"}},
                 "required": ["answer", "sure"], "additionalProperties": False}
G = {"model": MODEL_NAME, "temperature": 0}

#: (name, path, body): the battery. Outputs are compared exactly where they are deterministic (greedy, or a
#: seed); the rest (the sampled `n=2` case without a seed) by everything but the text.
BATTERY: list[tuple[str, str, Any]] = [
    ("completion greedy", COMPLETIONS, {**G, "prompt": "The quick brown fox", "max_tokens": 12, "ignore_eos": True}),
    ("completion logprobs + echo", COMPLETIONS, {**G, "prompt": "Once upon", "max_tokens": 4, "logprobs": 2,
                                                 "echo": True}),
    ("completion seeded n=2", COMPLETIONS, {"model": MODEL_NAME, "prompt": "Pick", "max_tokens": 6, "n": 2,
                                            "temperature": 1.0, "seed": 7}),
    ("completion n=2 greedy", COMPLETIONS, {**G, "prompt": "Pick", "max_tokens": 6, "n": 2}),
    ("completion sampling knobs", COMPLETIONS, {"model": MODEL_NAME, "prompt": "Knobs", "max_tokens": 8, "seed": 3,
                                                "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2,
                                                "min_tokens": 4, "stop_token_ids": [13], "logit_bias": {"42": 5}}),
    ("completion two prompts", COMPLETIONS, {**G, "prompt": ["first", "second"], "max_tokens": 3}),
    ("completion token ids", COMPLETIONS, {**G, "prompt": [1, 450, 4996], "max_tokens": 3}),
    ("completion no model", COMPLETIONS, {"prompt": "No model", "max_tokens": 3, "temperature": 0}),
    ("completion unknown field", COMPLETIONS, {**G, "prompt": "Extra", "max_tokens": 3, "not_a_field": {"x": 1},
                                               "guided_regex": "a+"}),
    ("completion regex", COMPLETIONS, {**G, "prompt": "Digits:", "max_tokens": 8,
                                       "structured_outputs": {"regex": "[0-9]{3}"}}),
    ("completion over context", COMPLETIONS, {**G, "prompt": "word " * (MAX_MODEL_LEN - 20), "max_tokens": 60}),
    ("completion priority", COMPLETIONS, {**G, "prompt": "Priority", "max_tokens": 2, "priority": 3}),
    ("bad: zero max_tokens", COMPLETIONS, {**G, "prompt": "hi", "max_tokens": 0}),
    ("bad: max_tokens type", COMPLETIONS, {**G, "prompt": "hi", "max_tokens": "ten"}),
    ("bad: temperature", COMPLETIONS, {"model": MODEL_NAME, "prompt": "hi", "temperature": 9, "max_tokens": 2}),
    ("bad: NaN top_p", COMPLETIONS, b'{"model": "tiny-llama", "prompt": "hi", "top_p": NaN, "max_tokens": 2}'),
    ("bad: seed", COMPLETIONS, {**G, "prompt": "hi", "seed": 10**24}),
    ("bad: empty stop", COMPLETIONS, {**G, "prompt": "hi", "stop": [""]}),
    ("bad: empty prompt", COMPLETIONS, {**G, "prompt": ""}),
    ("bad: prompt type", COMPLETIONS, {**G, "prompt": 42}),
    ("bad: long prompt", COMPLETIONS, {**G, "prompt": "word " * (MAX_MODEL_LEN + 50)}),
    ("bad: unknown model", COMPLETIONS, {"model": "gpt-4", "prompt": "hi"}),
    ("bad: lone surrogate", COMPLETIONS, b'{"model": "tiny-llama", "prompt": "\\ud800 hi", "max_tokens": 2}'),
    ("bad: json", COMPLETIONS, b'{"model": "tiny-llama", "prompt": "hi"'),
    ("bad: not an object", COMPLETIONS, b'[1, 2]'),
    ("bad: grammar", COMPLETIONS, {**G, "prompt": "hi", "structured_outputs": {"grammar": "not a grammar ::= ("}}),
    ("chat greedy", CHAT, {**G, "messages": HI, "max_tokens": 10, "ignore_eos": True}),
    ("chat logprobs", CHAT, {**G, "messages": HI, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}),
    ("chat json_object", CHAT, {**G, "messages": HI, "max_tokens": 24, "response_format": {"type": "json_object"}}),
    ("chat json_schema", CHAT, {**G, "messages": HI, "max_tokens": 40, "response_format": {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}}),
    ("chat choice", CHAT, {**G, "messages": HI, "max_tokens": 8, "structured_outputs": {"choice": ["red", "blue"]}}),
    ("chat stop + max_completion_tokens", CHAT, {**G, "messages": HI, "max_completion_tokens": 6, "stop": ["the"]}),
    ("chat no user turn", CHAT, {**G, "messages": [{"role": "system", "content": "Be brief."}], "max_tokens": 3}),
    ("chat named tool", CHAT, {**G, "messages": HI, "max_tokens": 40, "tools": TOOLS,
                               "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ("chat tool_choice none", CHAT, {**G, "messages": HI, "max_tokens": 3, "tools": TOOLS, "tool_choice": "none"}),
    ("bad: tools required", CHAT, {**G, "messages": HI, "max_tokens": 3, "tools": TOOLS, "tool_choice": "required"}),
    ("bad: tools auto", CHAT, {**G, "messages": HI, "max_tokens": 3, "tools": TOOLS, "tool_choice": "auto"}),
    ("bad: chat template", CHAT, {**G, "messages": HI, "max_tokens": 3, "chat_template": "{{ 'x' }}"}),
    ("bad: empty messages", CHAT, {**G, "messages": []}),
    ("bad: messages type", CHAT, {**G, "messages": "hi"}),
    ("bad: n=2 greedy chat", CHAT, {**G, "messages": HI, "max_tokens": 2, "n": 2}),
    ("bad: max_completion_tokens 0", CHAT, {**G, "messages": HI, "max_completion_tokens": 0}),
]


@pytest.mark.parametrize("name,path,body", BATTERY, ids=[case[0] for case in BATTERY])
def test_same_answer_as_plain_vllm(servers: dict[str, httpx.Client], name: str, path: str, body: Any) -> None:
    plain = _send(servers["vllm"], path, body)
    ours = _send(servers["ltr"], path, body, headers={"x-ltr-score-override": "1.5"} if "greedy" in name else None)
    assert ours.status_code == plain.status_code, (plain.text[:400], ours.text[:400])
    if plain.status_code == 200:
        assert ours.headers["x-ltr-replica"] and ours.headers["x-ltr-placement"] in ("override", "first")
        assert _stable(ours.json()) == _stable(plain.json())
        return
    error = ours.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == plain.status_code
    reference = plain.json()
    if isinstance(reference.get("error"), dict):   # vLLM's own error object: the same, word for word
        assert error == reference["error"]
    else:   # FastAPI's bare {"detail"} on vLLM's server: the same words in an error object
        assert error["message"] == reference["detail"]


@pytest.mark.parametrize("path,body", [
    (COMPLETIONS, {**G, "prompt": "Stream me", "max_tokens": 8, "ignore_eos": True, "stream": True,
                   "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    (CHAT, {**G, "messages": HI, "max_tokens": 8, "ignore_eos": True, "stream": True, "logprobs": True,
            "top_logprobs": 1, "stream_options": {"include_usage": True}}),
    (CHAT, {**G, "messages": HI, "max_tokens": 30, "stream": True, "response_format": {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}}),
], ids=["completion", "chat logprobs", "chat json_schema"])
def test_same_stream_as_plain_vllm(servers: dict[str, httpx.Client], path: str, body: dict) -> None:
    plain, ours = (_send(servers[name], path, body) for name in ("vllm", "ltr"))
    assert plain.status_code == ours.status_code == 200
    assert ours.headers["content-type"].startswith("text/event-stream")
    assert _stream_content(_events(ours.text)) == _stream_content(_events(plain.text))


def test_same_models_list(servers: dict[str, httpx.Client]) -> None:
    plain, ours = (servers[name].get("/v1/models").json() for name in ("vllm", "ltr"))
    assert _stable(ours) == _stable(plain)


def test_openai_client_features(ltr_serve: str, plain_vllm: str) -> None:
    import jsonschema

    for url in (ltr_serve, plain_vllm):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        logprobs = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=4, temperature=0,
                                                  logprobs=True, top_logprobs=3)
        tokens = logprobs.choices[0].logprobs.content
        assert len(tokens) == logprobs.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in tokens)
        sampled = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=5, n=2, temperature=1.0)
        assert [c.index for c in sampled.choices] == [0, 1] and sampled.usage.completion_tokens <= 10
        structured = client.chat.completions.create(
            model=MODEL_NAME, messages=HI, max_tokens=40, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}})
        answer = json.loads(structured.choices[0].message.content)   # a random model: valid only if guided
        jsonschema.validate(answer, ANSWER_SCHEMA)
        stream = client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=6, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and 1 <= usage.completion_tokens <= 6
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert chunks[0].choices[0].delta.role == "assistant"
        with pytest.raises(openai.BadRequestError, match="tool-call-parser"):
            client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=3, tools=TOOLS,
                                           tool_choice="required")


def test_output_cap_is_ours(servers: dict[str, httpx.Client]) -> None:
    """Above `max_tokens_cap` ltr-serve refuses (named field, vLLM's error shape) where vLLM shortens the
    answer to the cap; above the context both refuse, with their own words."""
    for max_tokens, plain_status in ((CAP + 1, 200), (10**6, 400)):
        body = {**G, "prompt": "Cap", "max_tokens": max_tokens}
        plain, ours = (_send(servers[name], COMPLETIONS, body) for name in ("vllm", "ltr"))
        assert plain.status_code == plain_status, plain.text
        assert ours.status_code == 400 and ours.json()["error"]["param"] == "max_tokens", ours.text
