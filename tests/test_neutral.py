"""The neutral placement of requests the predictor missed: mid-queue, not ahead of ranked work."""

from __future__ import annotations

import json
from pathlib import Path

from deployments.neutral import SHIPPED_CONFIG, NeutralPlacement, calibration_median
from deployments.predictor import Prediction
from ltr.scheduling.policy import RankPolicy, RankState


def test_rolling_median_of_recent_predictions_seeded_by_calibration() -> None:
    seed = Prediction(0.5, 300.0)
    neutral = NeutralPlacement(window=3, seed=seed)
    assert neutral.prediction() == seed   # before any prediction: the artifact's calibration median
    for score, tokens in [(-2.0, 20.0), (3.0, 900.0), (1.0, None)]:
        neutral.observe(Prediction(score, tokens))
    assert neutral.prediction() == Prediction(1.0, 460.0)
    neutral.observe(Prediction(4.0, 950.0))   # each window keeps its last 3 values: -2.0 leaves, 20 stays
    assert neutral.prediction() == Prediction(3.0, 900.0)


def test_shipped_calibration_median_and_a_missing_artifact(tmp_path: Path) -> None:
    shipped = json.loads(SHIPPED_CONFIG.read_text())["calibration"]
    median = calibration_median()
    assert median is not None and min(shipped["scores"]) < median.score < max(shipped["scores"])
    assert calibration_median(tmp_path / "missing.json") is None


def test_a_neutral_request_waits_behind_better_ranked_work_unlike_an_unscored_one() -> None:
    policy = RankPolicy(starvation=None)
    neutral = NeutralPlacement(window=8, seed=None)
    ranked = [RankState(f"r{i}", float(i), score=s) for i, s in enumerate([-3.0, -1.0, 2.0, 4.0])]
    for state in ranked:
        neutral.observe(Prediction(state.score, None))
    late_neutral = RankState("late", 10.0, score=neutral.prediction().score)
    late_unscored = RankState("unscored", 11.0, score=None)
    order = [s.request_id for s in policy.order([*ranked, late_neutral, late_unscored])]
    assert order == ["unscored", "r0", "r1", "late", "r2", "r3"]
