"""Where a request goes when the predictor does not score it in time: the middle of the queue.

The engine's convention orders an unscored request by arrival *ahead of* all ranked work, which is right
when no predictor is configured (pure FCFS) but wrong under overload: then the predictor times out on a
share of the requests and those jump the queue, turning LTR back into FCFS exactly when ranking matters.
So the ingress gives a late or failed request a neutral prediction instead: the median of the predictions
it saw last (before any, the shipped predictor's calibration median), flagged as a fallback.
"""

from __future__ import annotations

import json
import statistics
from collections import deque
from pathlib import Path

from deployments.predictor import Prediction

#: The shipped predictor's settings and calibration (score quantiles -> expected tokens).
SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "ltr" / "artifacts" / "predictor" / "config.json"


def calibration_median(config_path: Path = SHIPPED_CONFIG) -> Prediction | None:
    """The median score of a predictor artifact's calibration set and its expected tokens (None if absent)."""
    try:
        calibration = json.loads(config_path.read_text())["calibration"]
        scores, tokens = calibration["scores"], calibration["tokens"]
    except (OSError, KeyError, TypeError, ValueError):
        return None
    if not scores or len(scores) != len(tokens):
        return None
    middle = len(scores) // 2
    return Prediction(float(scores[middle]), float(tokens[middle]))


class NeutralPlacement:
    """Rolling median of the last `window` predictions: the stand-in for a request the predictor missed."""

    def __init__(self, window: int, seed: Prediction | None) -> None:
        self._scores: deque[float] = deque(maxlen=window)
        self._tokens: deque[float] = deque(maxlen=window)
        self._seed = seed

    def observe(self, prediction: Prediction) -> None:
        self._scores.append(prediction.score)
        if prediction.expected_tokens is not None:
            self._tokens.append(prediction.expected_tokens)

    def prediction(self) -> Prediction | None:
        if not self._scores:
            return self._seed
        tokens = statistics.median(self._tokens) if self._tokens else (
            self._seed.expected_tokens if self._seed else None)
        return Prediction(float(statistics.median(self._scores)), tokens)
