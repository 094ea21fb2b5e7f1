"""Simulator workloads: requests with arrival times, true lengths and predicted scores.

Scores follow the project convention (higher = longer predicted output). Besides the true length
(oracle = shortest-job-first) and the real predictor, scores can come from a noise model whose
Kendall tau against the true lengths is set on purpose, so the study can sweep predictor quality:

    z_true = Phi^-1(rank(output_len) / (n + 1))      Gaussian copula of the true lengths (ties broken randomly)
    score  = rho * z_true + sqrt(1 - rho^2) * eps,   eps ~ N(0, 1)

For a bivariate normal, Kendall tau = (2 / pi) * arcsin(rho), so rho = sin(pi * tau / 2) is the start;
rho is then bisected (noise fixed) until the *realized* tau on this very trace matches the target,
which also absorbs the ties in the true lengths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import kendalltau, norm


@dataclass(frozen=True)
class SimRequest:
    """One request as the simulator sees it."""

    request_id: str
    arrival: float
    prompt_len: int
    output_len: int
    score: float | None = None
    #: Predicted output tokens, used by the `least_work` router (None -> the router's default).
    expected_tokens: float | None = None

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"request {self.request_id}: prompt_len must be >= 1, got {self.prompt_len}")
        if self.output_len < 1:
            raise ValueError(f"request {self.request_id}: output_len must be >= 1, got {self.output_len}")
        if not math.isfinite(self.arrival) or self.arrival < 0:
            raise ValueError(f"request {self.request_id}: arrival must be finite and >= 0, got {self.arrival}")


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process at `rate` requests/s, first arrival at t=0."""
    if rate <= 0:
        raise ValueError(f"arrival rate must be > 0, got {rate}")
    gaps = rng.exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def build_requests(prompt_lens: Sequence[int], output_lens: Sequence[int], arrivals: Sequence[float],
                   scores: Sequence[float] | None = None,
                   expected_tokens: Sequence[float] | None = None) -> list[SimRequest]:
    n = len(prompt_lens)
    if not (len(output_lens) == len(arrivals) == n) or (scores is not None and len(scores) != n) \
            or (expected_tokens is not None and len(expected_tokens) != n):
        raise ValueError("prompt_lens, output_lens, arrivals (and scores/expected_tokens) must have equal length")
    return [SimRequest(request_id=f"r{i}", arrival=float(arrivals[i]), prompt_len=int(prompt_lens[i]),
                       output_len=int(output_lens[i]),
                       score=None if scores is None else float(scores[i]),
                       expected_tokens=None if expected_tokens is None else float(expected_tokens[i]))
            for i in range(n)]


def with_scores(requests: Sequence[SimRequest], scores: Sequence[float] | None,
                expected_tokens: Sequence[float] | None = None) -> list[SimRequest]:
    """The same requests with other scores (None = unscored, i.e. FCFS order for every policy)."""
    if scores is not None and len(scores) != len(requests):
        raise ValueError("one score per request is required")
    return [replace(r, score=None if scores is None else float(scores[i]),
                    expected_tokens=None if expected_tokens is None else float(expected_tokens[i]))
            for i, r in enumerate(requests)]


def _gaussian_ranks(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    jitter = rng.random(len(values))
    order = np.lexsort((jitter, values))
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    return norm.ppf(ranks / (len(values) + 1))


def noisy_scores(output_lens: Sequence[int], tau: float, rng: np.random.Generator,
                 tol: float = 0.005) -> tuple[np.ndarray, float]:
    """Scores whose Kendall tau with `output_lens` is `tau` (within `tol`); returns (scores, realized tau)."""
    if not -1.0 < tau < 1.0:
        if tau == 1.0:
            return np.asarray(output_lens, dtype=float), 1.0
        raise ValueError(f"target Kendall tau must be in (-1, 1], got {tau}")
    lens = np.asarray(output_lens, dtype=float)
    if len(lens) < 3:
        raise ValueError("need at least 3 requests to match a Kendall tau")
    z = _gaussian_ranks(lens, rng)
    eps = rng.standard_normal(len(lens))

    def realized(rho: float) -> tuple[np.ndarray, float]:
        s = rho * z + math.sqrt(max(1.0 - rho * rho, 0.0)) * eps
        return s, float(kendalltau(s, lens).statistic)

    lo, hi = -0.9999, 0.9999
    rho = math.sin(math.pi * tau / 2)
    scores, got = realized(rho)
    for _ in range(40):
        if abs(got - tau) <= tol:
            break
        if got < tau:
            lo = rho
        else:
            hi = rho
        rho = (lo + hi) / 2
        scores, got = realized(rho)
    return scores, got


def expected_tokens_from_scores(scores: Sequence[float], reference_lens: Sequence[int]) -> np.ndarray:
    """Map scores to token counts by quantile matching against a reference length distribution.

    The i-th smallest score gets the matching quantile of `reference_lens` (e.g. the train split), so
    the `least_work` router sees plausible token counts whatever the predictor's score scale.
    """
    s = np.asarray(scores, dtype=float)
    ref = np.sort(np.asarray(reference_lens, dtype=float))
    if len(ref) == 0:
        raise ValueError("reference length distribution is empty")
    ranks = np.argsort(np.argsort(s, kind="stable"), kind="stable")
    q = (ranks + 0.5) / len(s)
    return np.quantile(ref, q)
