"""Shared fixtures: the served model and the tiny test model, built once per machine (cached)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from ltr.models import prepare_model

    return prepare_model()


@pytest.fixture(scope="session")
def tiny_model_path(smollm2_path: Path) -> Path:
    from ltr.models import build_tiny_llama, cache_dir

    return build_tiny_llama(cache_dir() / "models" / "tiny-llama", tokenizer_from=smollm2_path)


@pytest.fixture(scope="session")
def sharegpt_pairs(smollm2_path: Path):
    from ltr.data import load_pairs

    return load_pairs(tokenizer_path=smollm2_path)


@pytest.fixture(scope="module")
def in_process_vllm() -> Iterator[None]:
    """vLLM engines a module builds run their engine core in the test process: the scheduler object is
    reachable and an engine-core error is raised in the test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield
