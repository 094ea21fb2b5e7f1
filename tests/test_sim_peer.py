"""sim_peer's stand-in for the real service: the step slowdown must make the simulated service run at the
throughput it is calibrated to, and a sample must follow peer_bench's rules for vLLM's client."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench() -> SimpleNamespace:
    """The benchmark modules, imported here and not at collection: scheduler_bench sets vLLM's environment at
    import (VLLM_ENABLE_V1_MULTIPROCESSING=0, OMP_NUM_THREADS=1, ...), which would change how every other test
    of the session starts an engine. The environment is put back once they are loaded."""
    saved = dict(os.environ)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import sim_peer
        from peer_bench import CLIENT_MIN_LEN
        from serve_bench import build_trace
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return SimpleNamespace(sim_peer=sim_peer, CLIENT_MIN_LEN=CLIENT_MIN_LEN, build_trace=build_trace)


@pytest.fixture(scope="module")
def table(bench) -> dict[str, tuple[float, float]]:
    """Prompt-length scores instead of the predictor's (what is tested here does not depend on them)."""
    w = bench.sim_peer.WORKLOAD
    pool = bench.build_trace(10**9, 1.0, w["max_tokens"], w["max_prompt_tokens"], 0, w["length_scale"])
    return {r.prompt: (float(r.prompt_len), 100.0) for r in pool}


def _burst_throughput(sim_peer, table: dict, slowdown: float) -> float:
    """Output tok/s of sample 0 under FCFS, all requests at once (what `slowdown_for` calibrates on)."""
    s = sim_peer.sample(0, 1.0, table)
    s["arrivals"] = np.zeros(len(s["arrivals"]))
    return sim_peer.measure((0, 1.0, s, "fcfs", None, "unused", slowdown))["throughput_tok_s"]


def test_the_slowdown_runs_a_fcfs_burst_at_the_target_throughput(bench, table) -> None:
    """Every step-time term must be slowed, or throughput would not scale as 1 / slowdown."""
    target = _burst_throughput(bench.sim_peer, table, 1.0) / 2.5
    slowdown = bench.sim_peer.slowdown_for(target, table)
    assert slowdown == pytest.approx(2.5)
    assert _burst_throughput(bench.sim_peer, table, slowdown) == pytest.approx(target, rel=1e-6)


def test_a_sample_keeps_the_clients_minimum_lengths_and_is_reproducible(bench, table) -> None:
    a = bench.sim_peer.sample(3, 6.0, table, num_prompts=200)
    b = bench.sim_peer.sample(3, 6.0, table, num_prompts=200)
    assert len(a["prompt_lens"]) == 200
    assert min(a["prompt_lens"]) >= bench.CLIENT_MIN_LEN and min(a["output_lens"]) >= bench.CLIENT_MIN_LEN
    assert a["output_lens"] == b["output_lens"] and np.array_equal(a["arrivals"], b["arrivals"])
    gaps = np.diff(np.concatenate([[0.0], a["arrivals"]]))
    assert gaps.mean() == pytest.approx(1 / 6.0, rel=0.2)
    assert bench.sim_peer.sample(4, 6.0, table, num_prompts=200)["output_lens"] != a["output_lens"]

