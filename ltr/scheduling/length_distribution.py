"""Calibrated output-length distribution per predictor score, and the Gittins index it gives.

Pure Python (no numpy, no torch): the vLLM adapter and the simulator query it per request. The table is
fit on the validation split by ``ltr.predictor.length_distribution`` and shipped next to the predictor
(``ltr/artifacts/predictor/length_distribution.json``): score bins (quantiles of validation scores), and
for each bin the output lengths at probability levels 0, 1/K, ..., 1; the size is uniform between two
consecutive quantiles (mass 1/K each). A pooled table over the whole validation split takes over once a
request outlives its bin's largest length.

The Gittins index of a request that has generated ``a`` tokens, for a size S, is

    G(a) = max over stopping points x > a of  E[reward; S <= x | S > a] / E[min(S, x) - a | S > a]

with the quantiles as stopping points and reward 1 (mean latency) or 1 / S (mean per-token latency).
``effective_remaining`` returns 1 / G: for a known size and reward 1 it is exactly the remaining tokens,
so the order generalizes SRPT, and a request that outlives its short prediction falls behind fresh work.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

ARTIFACT_NAME = "length_distribution.json"
SHIPPED_PATH = Path(__file__).resolve().parent.parent / "artifacts" / "predictor" / ARTIFACT_NAME


def _segments(quantiles: Sequence[float], attained: float) -> list[tuple[float, float, float]]:
    """(low, high, probability) of S given S > attained, uniform between consecutive quantiles."""
    k = len(quantiles) - 1
    if k == 0:
        return [(quantiles[0], quantiles[0], 1.0)] if quantiles[0] > attained else []
    out = []
    for low, high in zip(quantiles, quantiles[1:]):
        if high <= attained:
            continue
        share = 1.0 if low >= attained else (high - attained) / (high - low)
        out.append((max(low, attained), high, share / k))
    total = sum(p for _, _, p in out)
    return [(low, high, p / total) for low, high, p in out]


def gittins_remaining(quantiles: Sequence[float], attained: float, per_token: bool = False,
                      overhead: float = 0.0) -> float:
    """1 / Gittins index after `attained` tokens of a size uniform between consecutive `quantiles`.

    The best ratio of expected service spent to expected reward completed, over stopping at each
    quantile. The reward of completing is 1 for mean latency; with `per_token` it is 1 / size, a request's
    weight in mean per-token latency (latency / output tokens), which favours short sizes more. Infinite
    once the largest quantile is reached (nothing is known about what is left). `overhead` is work that
    comes first whatever the size (a prompt still to prefill), in the same units.
    """
    segments = _segments(quantiles, attained)
    best, spent, done, reward = math.inf, 0.0, 0.0, 0.0
    for low, high, p in segments:
        done += p
        spent += p * ((low + high) / 2 - attained)
        if not per_token:
            reward += p
        elif high > low:
            reward += p * math.log(high / max(low, 1.0)) / (high - low) if low >= 1.0 else p / max(high, 1.0)
        else:
            reward += p / max(high, 1.0)
        if reward > 0:
            best = min(best, (overhead + spent + (1.0 - done) * (high - attained)) / reward)
    return best


@dataclass(frozen=True)
class LengthDistribution:
    """Output-length quantiles per score bin, plus a pooled tail; built by ``from_mapping`` / ``load``."""

    #: Inner score bin edges, ascending: bin i holds scores in [edges[i-1], edges[i]).
    edges: tuple[float, ...]
    #: Per bin, output lengths at probability levels 0, 1/K, ..., 1 (ascending).
    bins: tuple[tuple[float, ...], ...]
    #: The same for the whole validation split (the tail model, and the distribution of a missing score).
    pooled: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.bins) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges need {len(self.edges) + 1} bins, got {len(self.bins)}")
        for name, seq in (("edges", self.edges), ("pooled", self.pooled), *(("bin", b) for b in self.bins)):
            if any(not math.isfinite(v) for v in seq) or list(seq) != sorted(seq):
                raise ValueError(f"length distribution {name} must be finite and ascending")
        if not self.pooled or any(not b for b in self.bins):
            raise ValueError("every bin and the pooled table need at least one quantile")

    def bin_of(self, score: float | None) -> int | None:
        """The score's bin; None for a missing score (the pooled table then stands for it)."""
        return None if score is None else bisect.bisect_right(self.edges, score)

    def boundaries(self, bin_index: int | None) -> tuple[float, ...]:
        """Generated-token counts at which a request's index changes: its bin's quantiles, then the pooled
        quantiles beyond the bin's largest."""
        return _boundaries(self, bin_index)

    def conditional_quantiles(self, bin_index: int | None, attained: float) -> tuple[float, ...]:
        """The table a request's size follows after `attained` tokens: its bin's while below the bin's
        largest length, else the pooled one (the validation split's tail), so an outlived prediction still
        has a remaining-work estimate."""
        own = self.pooled if bin_index is None else self.bins[bin_index]
        return own if attained < own[-1] else self.pooled

    def remaining(self, score: float | None, generated: int) -> float:
        """Expected remaining output tokens given the score and the tokens generated so far."""
        segments = _segments(self.conditional_quantiles(self.bin_of(score), generated), generated)
        if not segments:
            return math.inf
        return sum(p * ((low + high) / 2 - generated) for low, high, p in segments)

    def quantile(self, score: float | None, level: float) -> float:
        """Output length at probability `level` in [0, 1] for the score (linear between quantiles)."""
        table = self.pooled if score is None else self.bins[self.bin_of(score)]
        pos = min(max(level, 0.0), 1.0) * (len(table) - 1)
        low = math.floor(pos)
        high = min(low + 1, len(table) - 1)
        return table[low] + (table[high] - table[low]) * (pos - low)

    def effective_remaining(self, bin_index: int | None, attained: float, per_token: bool = False,
                            overhead: float = 0.0) -> float:
        """1 / Gittins index after `attained` generated tokens (see `gittins_remaining`)."""
        return gittins_remaining(self.conditional_quantiles(bin_index, attained), attained, per_token, overhead)

    def scaled(self, scale: float, cap: float) -> LengthDistribution:
        """The same distribution for answers cut to 1/`scale` of their length and capped at `cap` tokens (as
        the scheduler benchmark's workload is), so keys move where those shorter answers actually end."""
        if not (scale > 0 and cap >= 1):
            raise ValueError(f"scale must be > 0 and cap >= 1, got {scale}, {cap}")

        def cut(table: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(float(min(max(1, round(v / scale)), cap)) for v in table)

        return LengthDistribution(self.edges, tuple(cut(b) for b in self.bins), cut(self.pooled))

    def to_mapping(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "bins": [list(b) for b in self.bins], "pooled": list(self.pooled)}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> LengthDistribution:
        try:
            return cls(edges=tuple(float(v) for v in data["edges"]),
                       bins=tuple(tuple(float(v) for v in b) for b in data["bins"]),
                       pooled=tuple(float(v) for v in data["pooled"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"length distribution needs edges, bins and pooled lists: {exc}") from exc

    @classmethod
    def load(cls, path: Path | str = SHIPPED_PATH) -> LengthDistribution:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no length distribution; run `python -m ltr.predictor.length_distribution`")
        return cls.from_mapping(json.loads(path.read_text(encoding="utf-8")))


@lru_cache(maxsize=16)
def load_distribution(path: str | None = None) -> LengthDistribution:
    """The distribution at `path` (None: the shipped one), read once per process."""
    return LengthDistribution.load(SHIPPED_PATH if path is None else path)


@lru_cache(maxsize=4096)
def _boundaries(dist: LengthDistribution, bin_index: int | None) -> tuple[float, ...]:
    own = dist.pooled if bin_index is None else dist.bins[bin_index]
    return own + tuple(x for x in dist.pooled if x > own[-1])


def fit_length_distribution(scores: Sequence[float], lengths: Sequence[float], num_bins: int = 10,
                            levels_per_bin: int = 16, pooled_levels: int = 64) -> LengthDistribution:
    """Empirical quantiles (levels 0, 1/K, ..., 1) of `lengths` per score-quantile bin, and pooled."""
    pairs = sorted(zip((float(s) for s in scores), (float(y) for y in lengths)))
    if len(pairs) < num_bins * 2 or num_bins < 1 or levels_per_bin < 1 or pooled_levels < 1:
        raise ValueError(f"need at least {2 * num_bins} (score, length) pairs and positive sizes")
    n = len(pairs)
    cuts = [round(n * i / num_bins) for i in range(num_bins + 1)]
    groups = [pairs[cuts[i]:cuts[i + 1]] for i in range(num_bins)]
    edges = tuple((groups[i][-1][0] + groups[i + 1][0][0]) / 2 for i in range(num_bins - 1))
    return LengthDistribution(
        edges=edges,
        bins=tuple(_levels(sorted(y for _, y in g), levels_per_bin) for g in groups),
        pooled=_levels(sorted(y for _, y in pairs), pooled_levels))


def _levels(values: list[float], k: int) -> tuple[float, ...]:
    """Values at probability levels 0, 1/k, ..., 1 of a sorted sample (linear interpolation)."""
    out = []
    for j in range(k + 1):
        pos = j / k * (len(values) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(values) - 1)
        out.append(round(values[lo] + (values[hi] - values[lo]) * (pos - lo), 1))
    return tuple(out)
