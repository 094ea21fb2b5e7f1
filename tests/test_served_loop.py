"""The served-traffic loop end to end on the CPU stack: serve → log → retrain → hot swap → serve.

Real Ray Serve, the real predictor, a real vLLM engine (tiny model), real HTTP: every answered request is
in the engines' log with the predictor version that ranked it and the tokens it produced; `ltr
train-predictor --data LOG` fine-tunes on that log; a `serve deploy`-style update swaps the predictor in
place; requests keep being served and are logged under the new version.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_hot_swap import _deploy, _wait_for
from test_serve import _free_port

SETTINGS = {"max_length": 64}
#: 80 distinct prompts: the retraining run's validation slice needs 20 for its length calibration.
PROMPTS = [f"{topic} {detail}" for topic in ("Explain", "Summarize", "List", "Translate", "Describe",
                                             "Criticize", "Rewrite", "Outline")
           for detail in ("quicksort", "the French revolution", "three prime numbers", "a haiku about rain",
                          "how vaccines work", "the rules of chess", "a cover letter", "photosynthesis",
                          "the tax code", "a bedtime story")]


@pytest.fixture(scope="module")
def loop_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    import ray
    from ray import serve

    from deployments.app import build_app, build_predictor_app
    from ltr.models import build_tiny_llama, cache_dir

    model = str(build_tiny_llama(cache_dir() / "models" / "tiny-llama"))
    log_dir = tmp_path_factory.mktemp("served")
    port = _free_port()
    ray.init(address="local", _temp_dir=tempfile.mkdtemp(prefix="ltr-loop-test-"), include_dashboard=False,
             num_cpus=2, logging_level="WARNING", configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_predictor_app({"num_cpus": 0.25, "settings": SETTINGS}), name="ltr-predictor",
                  route_prefix=None)
        _deploy(SETTINGS)   # as `serve deploy` would: the settings as the deployment's user_config
        serve.run(build_app({
            "model": model, "num_engine_replicas": 1, "engine_num_cpus": 0.5,
            "engine_kwargs": {"max_num_seqs": 8, "max_model_len": 512, "enforce_eager": True},
            "served_log": {"directory": str(log_dir), "flush_interval_s": 0.2},
            "ingress": {"log_text": True, "predictor_timeout_s": 10.0},
        }), name="ltr", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "log": log_dir, "model": Path(model).name}
    finally:
        serve.shutdown()
        ray.shutdown()


def _serve(url: str, model: str, prompts: list[str]) -> dict[str, int]:
    """Completions with varied caps; request id (vLLM's, as logged) -> completion tokens."""
    answered = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        for i, prompt in enumerate(prompts):
            r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4 + 3 * (i % 7),
                                                    "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.headers["x-ltr-placement"] == "predicted"
            answered[r.headers["x-ltr-request-id"]] = r.json()["usage"]["completion_tokens"]
    return answered


def _records(log_dir: Path, expected: int, timeout_s: float = 30.0) -> list:
    from ltr.data.served_log import read_served_log

    deadline = time.monotonic() + timeout_s
    while True:
        records = list(read_served_log(log_dir))
        if len(records) >= expected or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_log_retrain_swap_loop(loop_app: dict, tmp_path: Path) -> None:
    from ray import serve

    from deployments.predictor import artifact_version
    from ltr.cli import main
    from ltr.data.served_log import text_sha256
    from ltr.predictor.model import shipped_artifact_dir

    handle = serve.get_deployment_handle("Predictor", app_name="ltr-predictor")
    shipped_version = handle.status.remote().result()["version"]
    assert shipped_version == artifact_version(shipped_artifact_dir(), SETTINGS["max_length"], False)
    answered = _serve(loop_app["url"], loop_app["model"], PROMPTS)
    records = _records(loop_app["log"], len(answered))
    assert len(records) == len(answered)
    assert sorted(r.output_tokens for r in records) == sorted(answered.values())
    assert {r.predictor_version for r in records} == {shipped_version}
    assert {r.text for r in records} == set(PROMPTS) and all(r.score is not None for r in records)
    assert all(r.conversation_sha256 == text_sha256(r.text) for r in records)   # a completion: by its prompt
    assert {r.model for r in records} == {loop_app["model"]}

    retrained = tmp_path / "retrained"
    assert main(["train-predictor", "--data", str(loop_app["log"]), "--init", str(shipped_artifact_dir()),
                 "--epochs", "1", "--list-size", "8", "--holdout", "0.2", "--val-fraction", "0.4",
                 "--output", str(retrained)]) == 0
    new_version = artifact_version(retrained, SETTINGS["max_length"], False)
    assert new_version != shipped_version
    _deploy({**SETTINGS, "artifact_dir": str(retrained)})
    assert _wait_for(handle, lambda status: status["version"] == new_version)["swaps"] == 1

    again = _serve(loop_app["url"], loop_app["model"], PROMPTS[:10])
    records = _records(loop_app["log"], len(answered) + len(again))
    assert len(records) == len(answered) + len(again)
    assert [r.predictor_version for r in records].count(new_version) == len(again)


def test_a_chat_is_logged_with_its_messages_for_the_retraining_to_render(loop_app: dict, smollm2_path: Path) -> None:
    """The loaded artifact has no chat template, so the predictor read the chat's last user message; the log
    keeps the conversation too, and a retraining for an artifact with a template reads it rendered."""
    from functools import partial

    from transformers import AutoTokenizer

    from ltr.data.served_log import read_served_log
    from ltr.predictor.model import default_backbone_path
    from ltr.predictor.render import chat_input
    from ltr.predictor.train import load_served_examples

    before = sum(1 for _ in read_served_log(loop_app["log"]))
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Name another one."}]
    with httpx.Client(base_url=loop_app["url"], timeout=120) as http:
        r = http.post("/v1/chat/completions", json={"model": loop_app["model"], "messages": messages,
                                                    "max_tokens": 5, "temperature": 0})
        # No user message: nothing for the predictor to read, so no messages for a retraining to render either.
        unreadable = http.post("/v1/chat/completions", json={
            "model": loop_app["model"], "max_tokens": 5, "temperature": 0,
            "messages": [{"role": "system", "content": "Say something."}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-ltr-placement"] == "predicted"
    assert unreadable.status_code == 200 and unreadable.headers["x-ltr-fallback"] == "no_text"
    records = [r for r in _records(loop_app["log"], before + 2) if r.text in ("Name another one.", "")]
    assert sorted(r.text for r in records) == ["", "Name another one."]
    [record] = [r for r in records if r.messages is not None]
    assert record.text == "Name another one." and record.messages == messages

    render = partial(chat_input, chat_template=AutoTokenizer.from_pretrained(smollm2_path).chat_template,
                     tokenizer=AutoTokenizer.from_pretrained(default_backbone_path()), max_length=128)
    splits = load_served_examples(loop_app["log"], holdout=0.2, val_fraction=0.4, read_chat=render)
    read = [e.prompt for e in splits.train + splits.val + splits.test if "Name another one." in e.prompt]
    assert read == [render(messages)] and "Name a colour." in read[0]
