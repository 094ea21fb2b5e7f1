"""How well the predictor ranks live traffic: Kendall tau of score vs served output tokens, censor-aware.

A finished answer's length is exact only when the model ended it; an answer cut at ``max_tokens`` (or
aborted) says only "at least n tokens". The estimator is Kendall's tau-b over the pairs whose length
order is *known* (Harrell's comparability rule from survival analysis):

- both exact: the order of their lengths (equal lengths are a known tie);
- one censored at ``c``, the other exact at ``e``: known only when ``e < c`` (the exact one is shorter);
  when ``e >= c`` the censored answer may have ended on either side of it;
- both censored: never known.

Over the known pairs, with ``C`` concordant, ``D`` discordant, ``Ts`` tied only in score and ``Ty``
tied only in length, ``tau = (C - D) / sqrt((C + D + Ts) * (C + D + Ty))``; pairs tied in both are left
out. Without censoring this is exactly scipy's tau-b. Censoring drops pairs and so widens the estimate's
spread, but does not bias it toward "long answers look short".

`LiveRankQuality` keeps this over the last N finished requests of each predictor version, updated in
O(N) per request (the new request's pairs are added, the evicted one's removed), with numpy only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Indices into a pair-count vector.
CONCORDANT, DISCORDANT, SCORE_TIED, LENGTH_TIED = range(4)


def pair_counts(score: float, length: int, censored: bool, scores: np.ndarray, lengths: np.ndarray,
                censored_flags: np.ndarray) -> np.ndarray:
    """Counts [C, D, Ts, Ty] of the known pairs between one item and each item of the arrays."""
    higher, lower = scores > score, scores < score
    shorter = (lengths < length) & ~censored_flags             # the other ended, shorter than this one
    c, d = np.count_nonzero(shorter & lower), np.count_nonzero(shorter & higher)
    ordered = np.count_nonzero(shorter)
    ty = 0
    if not censored:                                           # this one ended: longer others are known
        longer = lengths > length
        c += np.count_nonzero(longer & higher)
        d += np.count_nonzero(longer & lower)
        ordered += np.count_nonzero(longer)
        ty = np.count_nonzero((lengths == length) & ~censored_flags & (higher | lower))
    return np.array([c, d, ordered - c - d, ty], dtype=np.int64)


def tau_from_counts(counts: Sequence[int]) -> float | None:
    """Tau-b from [C, D, Ts, Ty]; None when no pair with a known order exists."""
    c, d, ts, ty = (int(x) for x in counts)
    denominator = math.sqrt((c + d + ts) * (c + d + ty))
    return (c - d) / denominator if denominator > 0 else None


def censored_kendall_tau(scores: Sequence[float], lengths: Sequence[int],
                         censored: Sequence[bool]) -> dict[str, Any]:
    """The censor-aware tau of a whole set (offline evaluation), with its pair counts."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(lengths, dtype=np.int64)
    c = np.asarray(censored, dtype=bool)
    if not len(s) == len(y) == len(c):
        raise ValueError(f"scores, lengths and censored differ in length ({len(s)}, {len(y)}, {len(c)})")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    counts = np.zeros(4, dtype=np.int64)
    for i in range(len(s) - 1):
        counts += pair_counts(s[i], y[i], bool(c[i]), s[i + 1:], y[i + 1:], c[i + 1:])
    return {"kendall_tau": tau_from_counts(counts), "n": int(len(s)), "censored": int(c.sum()),
            "known_pairs": int(counts[CONCORDANT] + counts[DISCORDANT] + counts[SCORE_TIED]),
            "concordant": int(counts[CONCORDANT]), "discordant": int(counts[DISCORDANT])}


class _Window:
    """The last `size` finished requests of one predictor version and their running pair counts."""

    def __init__(self, size: int) -> None:
        self.scores = np.zeros(size, dtype=np.float64)
        self.lengths = np.zeros(size, dtype=np.int64)
        self.censored = np.zeros(size, dtype=bool)
        self.counts = np.zeros(4, dtype=np.int64)
        self.filled = 0
        self.next = 0       # slot the next request goes to (the oldest once full)
        self.seen = 0

    def add(self, score: float, length: int, censored: bool) -> None:
        # An item's pair with itself is never known-ordered nor a length tie with a score gap, so both
        # updates run over the whole filled window without masking the slot out.
        slot, filled = self.next, self.filled
        if filled == len(self.scores):   # evict the oldest: take its pairs with the rest out
            self.counts -= pair_counts(self.scores[slot], int(self.lengths[slot]), bool(self.censored[slot]),
                                       self.scores, self.lengths, self.censored)
        self.scores[slot], self.lengths[slot], self.censored[slot] = score, length, censored
        self.filled = filled = min(filled + 1, len(self.scores))
        self.counts += pair_counts(score, length, censored, self.scores[:filled], self.lengths[:filled],
                                   self.censored[:filled])
        self.next = (slot + 1) % len(self.scores)
        self.seen += 1

    def snapshot(self) -> dict[str, Any]:
        c = self.counts
        return {"kendall_tau": tau_from_counts(c), "n": self.filled, "seen": self.seen,
                "censored": int(self.censored[: self.filled].sum()),
                "known_pairs": int(c[CONCORDANT] + c[DISCORDANT] + c[SCORE_TIED])}


@dataclass(frozen=True)
class LiveQualityConfig:
    """Window length per predictor version, and how many versions are kept (the most recently seen)."""

    window: int = 1000
    max_versions: int = 4

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"live quality window must be >= 2, got {self.window}")
        if self.max_versions < 1:
            raise ValueError(f"live quality max_versions must be >= 1, got {self.max_versions}")


class LiveRankQuality:
    """Rolling censor-aware Kendall tau per predictor version; feed it every finished request."""

    def __init__(self, config: LiveQualityConfig | None = None) -> None:
        self.config = config or LiveQualityConfig()
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        #: Finished requests not counted: no predictor version (neutral/override placement) or no score.
        self.unattributed = 0

    def observe(self, version: str | None, score: float | None, output_tokens: int, censored: bool) -> None:
        if version is None or score is None or not math.isfinite(score):
            self.unattributed += 1
            return
        window = self._windows.get(version)
        if window is None:
            window = self._windows[version] = _Window(self.config.window)
            if len(self._windows) > self.config.max_versions:
                self._windows.popitem(last=False)
        self._windows.move_to_end(version)
        window.add(float(score), int(output_tokens), bool(censored))

    def observe_record(self, record: Any) -> None:
        """Observe a `ltr.data.served_log.ServedRecord` (what the scheduler writes to the log)."""
        self.observe(record.predictor_version, record.score, record.output_tokens, record.censored)

    def snapshot(self) -> dict[str, Any]:
        """For /v1/ltr/stats and /metrics: per version (most recent last) tau, window fill, censored."""
        return {"window": self.config.window, "unattributed": self.unattributed,
                "versions": {v: w.snapshot() for v, w in self._windows.items()}}
