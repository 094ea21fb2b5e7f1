"""Predictor deployment: scores prompts in batches with the shipped ranking predictor.

It is its own Serve application (default name `ltr-predictor`) so it scales, restarts and can even be
deleted independently of the serving path: the ingress treats a missing, failing or slow predictor
as "no score" and the engine then serves that request in arrival order (FCFS). Until the trained
artifact exists the deployment reports itself unavailable and keeps checking for it, so a newly
landed artifact is picked up without a redeploy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from ray import serve

logger = logging.getLogger("ray.serve")


@dataclass
class Prediction:
    """Score (higher = longer output) and the calibrated expected output length in tokens."""

    score: float
    expected_tokens: float | None


@dataclass(frozen=True)
class PredictorSettings:
    """Runtime settings, changed live through Serve's `user_config` (no replica restart)."""

    #: Seconds between attempts to load a missing/broken artifact.
    reload_interval_s: float = 30.0
    #: Fault drill for reliability tests: "none", "raise" (every call fails) or "hang" (answers
    #: only after `hang_s`, far past any sane ingress timeout).
    fault: str = "none"
    hang_s: float = 30.0
    #: Serving variant of the shipped predictor (`RankPredictor.for_serving`): prompts cut to this many
    #: MiniLM tokens (None: as trained, 512) and int8 dynamic quantization. 256 tokens, no int8, by
    #: measurement (`predictor_quality.py speed`): 2.1x the prompts/s of 512 for -0.007 validation tau;
    #: int8 costs 0.024 tau.
    max_length: int | None = 256
    int8: bool = False

    def __post_init__(self) -> None:
        if self.max_length is not None and not 8 <= self.max_length <= 512:
            raise ValueError(f"predictor max_length must be in [8, 512], got {self.max_length}")
        if self.fault not in ("none", "raise", "hang"):
            raise ValueError(f"predictor fault must be none, raise or hang, got {self.fault!r}")
        if self.reload_interval_s <= 0:
            raise ValueError("reload_interval_s must be > 0")


class PredictorUnavailable(RuntimeError):
    """No trained predictor is loaded (artifact missing or unreadable)."""


class Predictor:
    """The predictor deployment's class; `app.py` wraps it with `serve.deployment` options."""

    def __init__(self) -> None:
        self.settings = PredictorSettings()
        self._model: Any = None
        self._load_error: str | None = None
        self._last_attempt = 0.0
        self._loading: asyncio.Task | None = None
        self.batches = 0
        self.scored = 0
        self._try_load()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        previous, self.settings = self.settings, PredictorSettings(**(user_config or {}))
        if (previous.max_length, previous.int8) != (self.settings.max_length, self.settings.int8):
            self._try_load()   # another serving variant of the artifact

    def _try_load(self) -> None:
        from ltr.predictor import load_shipped_predictor

        self._last_attempt = time.monotonic()
        try:
            self._model = load_shipped_predictor(device="cpu").for_serving(self.settings.max_length,
                                                                           self.settings.int8)
            self._load_error = None
            logger.info("predictor loaded from the shipped artifact")
        except (FileNotFoundError, ValueError, OSError) as exc:
            self._model = None
            self._load_error = f"{type(exc).__name__}: {exc}"
            logger.warning("predictor unavailable (%s); requests fall back to FCFS", self._load_error)

    async def _ensure_loaded(self) -> None:
        if self._model is not None or time.monotonic() - self._last_attempt < self.settings.reload_interval_s:
            return
        if self._loading is None or self._loading.done():
            self._loading = asyncio.get_running_loop().create_task(asyncio.to_thread(self._try_load))
        await self._loading

    def _score_sync(self, prompts: list[str]) -> list[Prediction]:
        scores = self._model.score(prompts)
        try:
            expected: list[float | None] = list(self._model.expected_tokens(scores))
        except ValueError:  # an uncalibrated predictor still ranks
            expected = [None] * len(scores)
        return [Prediction(float(s), None if e is None else float(e)) for s, e in zip(scores, expected)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=4)
    async def score(self, prompts: list[str]) -> list[Prediction]:
        """Batched scoring; raises PredictorUnavailable when no model is loaded."""
        if self.settings.fault == "hang":
            await asyncio.sleep(self.settings.hang_s)
        if self.settings.fault == "raise":
            raise RuntimeError("predictor fault drill: raise")
        await self._ensure_loaded()
        if self._model is None:
            raise PredictorUnavailable(self._load_error or "predictor not loaded")
        predictions = await asyncio.to_thread(self._score_sync, prompts)
        self.batches += 1
        self.scored += len(prompts)
        return predictions

    def status(self) -> dict[str, Any]:
        return {"loaded": self._model is not None, "error": self._load_error, "batches": self.batches,
                "scored": self.scored, "fault": self.settings.fault}

    async def check_health(self) -> None:
        """Healthy even without an artifact: unavailability is a served state (FCFS), not a crash."""
