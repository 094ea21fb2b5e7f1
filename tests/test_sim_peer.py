"""sim_peer's stand-in for the real service: the step slowdown must make the simulated service run at the
throughput it is calibrated to, and a sample must follow peer_bench's rules for vLLM's client."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sim_peer  # noqa: E402
from peer_bench import CLIENT_MIN_LEN  # noqa: E402
from serve_bench import build_trace  # noqa: E402


@pytest.fixture(scope="module")
def table() -> dict[str, tuple[float, float]]:
    """Prompt-length scores instead of the predictor's (what is tested here does not depend on them)."""
    w = sim_peer.WORKLOAD
    pool = build_trace(10**9, 1.0, w["max_tokens"], w["max_prompt_tokens"], 0, w["length_scale"])
    return {r.prompt: (float(r.prompt_len), 100.0) for r in pool}


def _burst_throughput(table: dict, slowdown: float) -> float:
    """Output tok/s of sample 0 under FCFS, all requests at once (what `slowdown_for` calibrates on)."""
    s = sim_peer.sample(0, 1.0, table)
    s["arrivals"] = np.zeros(len(s["arrivals"]))
    return sim_peer.measure((0, 1.0, s, "fcfs", None, "unused", slowdown))["throughput_tok_s"]


def test_the_slowdown_runs_a_fcfs_burst_at_the_target_throughput(table) -> None:
    """Every step-time term must be slowed, or throughput would not scale as 1 / slowdown."""
    target = _burst_throughput(table, 1.0) / 2.5
    slowdown = sim_peer.slowdown_for(target, table)
    assert slowdown == pytest.approx(2.5)
    assert _burst_throughput(table, slowdown) == pytest.approx(target, rel=1e-6)


def test_a_sample_keeps_the_clients_minimum_lengths_and_is_reproducible(table) -> None:
    a = sim_peer.sample(3, 6.0, table, num_prompts=200)
    b = sim_peer.sample(3, 6.0, table, num_prompts=200)
    assert len(a["prompt_lens"]) == 200
    assert min(a["prompt_lens"]) >= CLIENT_MIN_LEN and min(a["output_lens"]) >= CLIENT_MIN_LEN
    assert a["output_lens"] == b["output_lens"] and np.array_equal(a["arrivals"], b["arrivals"])
    gaps = np.diff(np.concatenate([[0.0], a["arrivals"]]))
    assert gaps.mean() == pytest.approx(1 / 6.0, rel=0.2)
    assert sim_peer.sample(4, 6.0, table, num_prompts=200)["output_lens"] != a["output_lens"]
