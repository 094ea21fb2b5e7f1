"""Live ranking quality: the censor-aware tau against scipy and hand-counted pairs, and the rolling window."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kendalltau

from ltr.data.served_log import ServedRecord
from ltr.predictor.live_quality import LiveQualityConfig, LiveRankQuality, censored_kendall_tau


def test_uncensored_equals_scipy_tau_b_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200).round(1)          # ties in score
    lengths = rng.integers(0, 20, size=200) + (scores * 8).astype(int)   # ties in length, some signal
    ours = censored_kendall_tau(scores, lengths, np.zeros(200, dtype=bool))
    assert ours["kendall_tau"] == pytest.approx(kendalltau(scores, lengths).statistic, abs=1e-12)
    assert ours["kendall_tau"] > 0.3


def test_censored_pairs_by_hand() -> None:
    # a: exact 10, b: exact 30, c: censored at 20 (>= 20), d: censored at 5 (>= 5).
    # Known pairs: a<b (exact both); a<c (a exact 10 < 20); c vs b unknown (c may pass 30);
    # d vs a, b, c unknown (d >= 5 only: a=10 and b=30 are not shorter than 5; c censored).
    lengths, censored = [10, 30, 20, 5], [False, False, True, True]
    scores = [1.0, 2.0, 0.0, 9.0]                   # a<b concordant, a<c discordant (score c < a)
    result = censored_kendall_tau(scores, lengths, censored)
    assert (result["concordant"], result["discordant"], result["known_pairs"]) == (1, 1, 2)
    assert result["kendall_tau"] == 0.0
    # d's score says "longest": that would count against it if d's "at least 5" were read as exactly 5.
    assert censored_kendall_tau([1.0, 2.0, 3.0, 9.0], lengths, censored)["kendall_tau"] == 1.0
    # Read as exact, the same data is discordant on d's three pairs and on c (20, score 3) vs b (30, score 2).
    naive = censored_kendall_tau([1.0, 2.0, 3.0, 9.0], lengths, [False] * 4)
    assert (naive["concordant"], naive["discordant"]) == (2, 4)


def test_censored_tie_is_not_known() -> None:
    # exact 7 and censored at 7: the censored one is >= 7, so neither order nor tie is known.
    assert censored_kendall_tau([0.0, 1.0], [7, 7], [False, True])["known_pairs"] == 0
    assert censored_kendall_tau([0.0, 1.0], [7, 7], [False, True])["kendall_tau"] is None
    # exact 6 below a censored 7: known shorter.
    assert censored_kendall_tau([0.0, 1.0], [6, 7], [False, True])["kendall_tau"] == 1.0


def test_rolling_window_matches_batch_per_version() -> None:
    rng = np.random.default_rng(1)
    n, window = 700, 150
    scores = rng.normal(size=n)
    lengths = rng.integers(1, 64, size=n)
    censored = rng.random(n) < 0.25
    live = LiveRankQuality(LiveQualityConfig(window=window, max_versions=2))
    for i in range(n):
        live.observe("v1" if i % 2 else "v2", scores[i], int(lengths[i]), bool(censored[i]))
        if i in (40, 333, n - 1):
            for version, parity in (("v1", 1), ("v2", 0)):
                idx = np.arange(i + 1)[np.arange(i + 1) % 2 == parity][-window:]
                expected = censored_kendall_tau(scores[idx], lengths[idx], censored[idx])
                got = live.snapshot()["versions"][version]
                assert got["kendall_tau"] == pytest.approx(expected["kendall_tau"], abs=1e-12)
                assert (got["n"], got["censored"], got["known_pairs"]) == \
                       (len(idx), int(censored[idx].sum()), expected["known_pairs"])


def test_versions_unattributed_and_eviction() -> None:
    live = LiveRankQuality(LiveQualityConfig(window=4, max_versions=2))
    live.observe(None, 1.0, 5, False)                # neutral placement: not the predictor's score
    live.observe("a", None, 5, False)
    for v in ("a", "b", "c"):
        live.observe(v, 1.0, 5, False)
    snap = live.snapshot()
    assert snap["unattributed"] == 2 and list(snap["versions"]) == ["b", "c"]
    record = ServedRecord(time=0.0, model="m", request_id="r", finish_reason="length", output_tokens=9,
                          max_tokens=9, prompt_tokens=3, score=2.0, predictor_version="c", input_sha256=None,
                          input_chars=None)
    live.observe_record(record)
    assert live.snapshot()["versions"]["c"]["censored"] == 1
    with pytest.raises(ValueError):
        LiveQualityConfig(window=1)
