"""Ranking metrics for length predictors, all on the convention higher score = longer output."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def kendall_tau(scores: Sequence[float], lengths: Sequence[float]) -> float:
    """Kendall's tau-b between predicted scores and true output lengths over the whole split."""
    from scipy.stats import kendalltau

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    if len(s) != len(y) or len(s) < 2:
        raise ValueError(f"need two equal-length sequences of at least 2 items (got {len(s)} and {len(y)})")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    tau = kendalltau(s, y).statistic
    return float(tau) if np.isfinite(tau) else 0.0


def ranking_report(scores: Sequence[float], lengths: Sequence[float],
                   expected_tokens: Sequence[float] | None = None,
                   censored: Sequence[bool] | None = None) -> dict[str, float]:
    """Kendall tau, Spearman rho, and (when given) the calibration's mean absolute error in tokens.

    With `censored` (served traffic: answers cut at max_tokens or aborted are lower bounds) the tau is
    the censor-aware one of `ltr.predictor.live_quality`, and Spearman and the error are over the
    answers the model ended itself.
    """
    from scipy.stats import spearmanr

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
    exact = np.ones(len(s), dtype=bool) if censored is None else ~np.asarray(censored, dtype=bool)
    if censored is None:
        report = {"n": int(len(s)), "kendall_tau": kendall_tau(s, y)}
    else:
        from ltr.predictor.live_quality import censored_kendall_tau

        tau = censored_kendall_tau(s, y.astype(np.int64), ~exact)
        report = {"n": int(len(s)), "kendall_tau": tau["kendall_tau"], "censored": tau["censored"],
                  "known_pairs": tau["known_pairs"]}
    report["spearman"] = float(spearmanr(s[exact], y[exact]).statistic)
    if expected_tokens is not None:
        report["calibration_mae_tokens"] = float(np.mean(np.abs(np.asarray(expected_tokens)[exact] - y[exact])))
    return report
