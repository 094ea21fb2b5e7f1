"""peer_bench's summary: ratios against plain vLLM only where both systems answered every request."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peer_bench  # noqa: E402


def _row(system: str, sample: int, completed: int, per_token: float, tok_s: float) -> dict:
    return {"system": system, "rate": 6.0, "sample": sample, "num_requests": 48, "completed": completed,
            "per_token_latency_mean_s": per_token, "e2e_mean_s": 20 * per_token, "e2e_p99_s": 40 * per_token,
            "ttft_mean_s": 10 * per_token, "output_throughput_tok_s": tok_s, "scored_share": 1.0,
            "ranked_share": 1.0}


def test_a_sample_a_system_did_not_finish_has_no_ratios_and_is_not_the_worst() -> None:
    """Sample 0: plain vLLM answered 1 of 48 (the seeded-request crash), so its one request's latency says
    nothing about the 48 ltr-serve answered; sample 1: both answered all, ltr-serve 2x faster per token."""
    rows = [_row("vllm", 0, 1, 0.6, 0.4), _row("ltr", 0, 48, 0.7, 90.0),
            _row("vllm", 1, 48, 0.8, 80.0), _row("ltr", 1, 48, 0.4, 88.0)]
    summary = peer_bench.compare(rows, "ltr", 6.0)
    crashed, complete = summary["per_sample"]
    assert crashed["answered"] == {"vllm": "1/48", "ltr": "48/48"}
    assert crashed["per_token_gain_vs_vllm"] is None and crashed["throughput_ratio_vs_vllm"] is None
    assert complete["per_token_gain_vs_vllm"] == 2.0
    assert complete["throughput_ratio_vs_vllm"] == 1.1
    assert summary["worst_sample"] == 1 and summary["per_token_gain_vs_vllm"] == 2.0
    assert summary["min_over_samples"]["throughput_ratio_vs_vllm"] == 1.1


def test_ltr_over_its_own_fcfs_needs_both_runs_complete() -> None:
    rows = [_row("ltr-fcfs", 0, 40, 0.9, 70.0), _row("ltr", 0, 48, 0.3, 90.0),
            _row("ltr-fcfs", 1, 48, 0.9, 70.0), _row("ltr", 1, 48, 0.3, 90.0)]
    first, second = peer_bench._fcfs_over_ltr(rows, 6.0)
    assert first is None and abs(second - 3.0) < 1e-9


def test_stream_gaps_find_the_longest_pause_of_each_answer() -> None:
    """Three answers: steady 40 ms tokens, one 1.2 s pause, one 0.6 s pause; one answer of a single token has no
    gaps and is left out."""
    gaps = peer_bench.stream_gaps([[0.04] * 20, [0.04, 1.2, 0.04], [0.6, 0.05], []])
    assert gaps["itl_longest_max_s"] == 1.2 and gaps["requests_stalled"] == 2
    assert 0.6 < gaps["itl_longest_p99_s"] <= 1.2
    assert peer_bench.stream_gaps([]) == {"itl_longest_p99_s": None, "itl_longest_max_s": None,
                                          "requests_stalled": None}
