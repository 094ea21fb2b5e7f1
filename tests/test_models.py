"""The converted SmolLM2 folder and the tiny test model serve on real vLLM (CPU)."""

from __future__ import annotations

import json
from pathlib import Path


def test_converted_folder_has_weights_tokenizer_and_chat_template(smollm2_path: Path) -> None:
    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert any(smollm2_path.glob("*.safetensors"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "hi" in text and text != "hi"


def test_prepare_model_is_idempotent(smollm2_path: Path) -> None:
    from ltr.models import prepare_model

    before = {p.name: p.stat().st_mtime_ns for p in smollm2_path.iterdir()}
    assert prepare_model() == smollm2_path
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_path.iterdir()} == before


def test_vllm_answers_from_converted_smollm2_deterministically(smollm2_path: Path) -> None:
    from vllm import LLM, SamplingParams

    from ltr.models import SERVED_DTYPE

    llm = LLM(model=str(smollm2_path), max_model_len=1024, max_num_seqs=4, dtype=SERVED_DTYPE, seed=0,
              enforce_eager=True)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=24)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        first = llm.chat(messages, params)[0].outputs[0].text
        second = llm.chat(messages, params)[0].outputs[0].text
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert "Paris" in first
    assert first == second


def test_tiny_model_config_is_vllm_cpu_compatible(tiny_model_path: Path) -> None:
    config = json.loads((tiny_model_path / "config.json").read_text())
    assert config["head_dim"] >= 32 and config["num_hidden_layers"] == 2
