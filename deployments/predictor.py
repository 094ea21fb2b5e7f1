"""Predictor deployment: scores prompts and chats in batches with the shipped ranking predictor.

A chat arrives as its messages and is turned into the predictor's input here, by the loaded artifact's
own renderer (`RankPredictor.chat_input`, the function training and evaluation use), so the ingress needs
no tokenizer and the input always matches the model that scores it, across hot swaps too.

It is its own Serve application (default name `ltr-predictor`) so it scales, restarts and can even be
deleted independently of the serving path: the ingress treats a missing, failing or slow predictor
as "no score" and the engine then serves that request in arrival order (FCFS). Until the trained
artifact exists the deployment reports itself unavailable and keeps checking for it, so a newly
landed artifact is picked up without a redeploy.

Hot swap: a new `artifact_dir` (or serving variant) in the Predictor deployment's `user_config` (in a
Serve config, `deployments: [{name: Predictor, user_config: {...}}]`, then `serve deploy`) is loaded
beside the model in use, which keeps scoring until the new one is ready; then one assignment swaps
them, so no request fails or goes unscored. (Serve applies a changed `user_config` in place; changed
application `args`, or `serve.run` from Python, replace the replica instead.) A new artifact that does
not load leaves the old one serving (the error is in `status()`). Every Prediction names the version
that made it, so the served-traffic log and the live tau attribute each score.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ray import serve

logger = logging.getLogger("ray.serve")


@dataclass
class Prediction:
    """Score (higher = longer output), the calibrated expected output length in tokens, and which
    predictor made it (`artifact_version`; None: not a predictor's score, e.g. a neutral placement)."""

    score: float
    expected_tokens: float | None
    version: str | None = None
    #: The text the predictor scored (a chat rendered by the artifact's renderer); None: not scored.
    input_text: str | None = None
    #: Seconds the predictor replica spent on the batch that scored it (the forward pass and any wait for a
    #: scoring thread). The rest of a call's wait at the ingress is routing, transport and its own loop.
    replica_s: float | None = None


#: What the ingress asks to score: a completion's prompt, or a chat's messages ({"role", "content"}).
PredictorInput = Union[str, list[dict[str, Any]]]


def artifact_version(directory: Path, max_length: int | None, int8: bool) -> str:
    """Content hash of the artifact's files plus the serving variant: the same weights served the same
    way always get the same name, whatever folder they were copied to."""
    from ltr.predictor.model import CONFIG_NAME, WEIGHTS_NAME

    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        digest.update((directory / name).read_bytes())
    return f"{digest.hexdigest()[:12]}@{max_length or 'trained'}{'-int8' if int8 else ''}"


@dataclass(frozen=True)
class _Loaded:
    """The model in use and its version, swapped as one object so a batch never mixes two predictors."""

    model: Any
    version: str
    artifact_dir: Path
    load_s: float   # how long loading took (the old model kept scoring meanwhile)
    runtime: str    # what runs the forward pass (PredictorSettings.runtime)


@dataclass(frozen=True)
class PredictorSettings:
    """Runtime settings, changed live through Serve's `user_config` (no replica restart)."""

    #: The predictor artifact (`ltr train-predictor --output`); None: the shipped one. Changing it live
    #: is the hot swap.
    artifact_dir: str | None = None
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
    #: What runs the forward pass: "onnx" (ONNX Runtime, the same scores about twice as fast on CPU:
    #: `ltr.predictor.onnx_runtime`) or "torch". None: "onnx", or "torch" with `int8` (a torch quantization).
    runtime: str | None = None

    def __post_init__(self) -> None:
        if self.runtime not in (None, "onnx", "torch"):
            raise ValueError(f"predictor runtime must be onnx or torch, got {self.runtime!r}")
        if self.int8 and self.runtime == "onnx":
            raise ValueError("predictor int8 is torch's dynamic quantization: use runtime torch (or leave it unset)")
        if self.max_length is not None and not 8 <= self.max_length <= 512:
            raise ValueError(f"predictor max_length must be in [8, 512], got {self.max_length}")
        if self.fault not in ("none", "raise", "hang"):
            raise ValueError(f"predictor fault must be none, raise or hang, got {self.fault!r}")
        if self.reload_interval_s <= 0:
            raise ValueError("reload_interval_s must be > 0")

    @property
    def forward_runtime(self) -> str:
        """The runtime in effect: the one set, else ONNX Runtime unless int8 asks for torch's quantization."""
        return self.runtime or ("torch" if self.int8 else "onnx")

    @property
    def serving_variant(self) -> tuple:
        """What a loaded model depends on: a change reloads it."""
        return self.artifact_dir, self.max_length, self.int8, self.forward_runtime


class PredictorUnavailable(RuntimeError):
    """No trained predictor is loaded (artifact missing or unreadable)."""


class Predictor:
    """The predictor deployment's class; `app.py` wraps it with `serve.deployment` options."""

    def __init__(self) -> None:
        self.settings = PredictorSettings()
        self._loaded: _Loaded | None = None
        self._load_error: str | None = None
        self._last_attempt = 0.0
        self._loading: asyncio.Task | None = None
        self._swap_lock = asyncio.Lock()
        self.batches = 0
        self.scored = 0
        self.swaps = 0
        # Loaded once at start: by the first reconfigure (Serve calls it before the replica takes
        # traffic), or, deployed without a user_config, by the first batch.

    def _artifact(self) -> Path:
        from ltr.predictor.model import shipped_artifact_dir

        return Path(self.settings.artifact_dir) if self.settings.artifact_dir else shipped_artifact_dir()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """New settings; a new artifact or serving variant is loaded off the event loop, then swapped in."""
        async with self._swap_lock:   # one swap at a time, in the order the configs came
            previous, self.settings = self.settings, PredictorSettings(**(user_config or {}))
            changed = previous.serving_variant != self.settings.serving_variant
            if changed or self._loaded is None:
                await asyncio.to_thread(self._try_load)

    def _try_load(self) -> None:
        """Load the configured artifact; on failure keep whatever model is in use."""
        from ltr.predictor.model import RankPredictor
        from ltr.predictor.onnx_runtime import OnnxRankPredictor

        self._last_attempt = started = time.monotonic()
        directory = self._artifact()
        try:
            model = RankPredictor.from_pretrained(directory, device="cpu").for_serving(self.settings.max_length,
                                                                                     self.settings.int8)
            if self.settings.forward_runtime == "onnx":
                model = OnnxRankPredictor(model)
            loaded = _Loaded(model, artifact_version(directory, self.settings.max_length, self.settings.int8),
                             directory, time.monotonic() - started, self.settings.forward_runtime)
        except (FileNotFoundError, ValueError, OSError, TypeError, ImportError) as exc:
            self._load_error = f"{type(exc).__name__}: {exc}"
            if self._loaded is None:
                logger.warning("predictor unavailable (%s); requests fall back to FCFS", self._load_error)
            else:
                logger.error("predictor %s did not load (%s); still serving %s", directory, self._load_error,
                             self._loaded.version)
            return
        if self._loaded is not None:
            self.swaps += 1
        self._loaded, self._load_error = loaded, None
        logger.info("predictor %s loaded from %s", loaded.version, directory)

    async def _ensure_loaded(self) -> None:
        if self._loaded is not None or time.monotonic() - self._last_attempt < self.settings.reload_interval_s:
            return
        if self._loading is None or self._loading.done():
            self._loading = asyncio.get_running_loop().create_task(asyncio.to_thread(self._try_load))
        await self._loading

    @staticmethod
    def _score_sync(loaded: _Loaded, inputs: list[PredictorInput], started: float) -> list[Prediction]:
        texts = [item if isinstance(item, str) else loaded.model.chat_input(item) for item in inputs]
        scores = loaded.model.score(texts)
        try:
            expected: list[float | None] = list(loaded.model.expected_tokens(scores))
        except ValueError:  # an uncalibrated predictor still ranks
            expected = [None] * len(scores)
        replica_s = time.monotonic() - started
        return [Prediction(float(s), None if e is None else float(e), loaded.version, text, replica_s)
                for s, e, text in zip(scores, expected, texts)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=4)
    async def score(self, inputs: list[PredictorInput]) -> list[Prediction]:
        """Batched scoring of prompts and chats; raises PredictorUnavailable when no model is loaded."""
        if self.settings.fault == "hang":
            await asyncio.sleep(self.settings.hang_s)
        if self.settings.fault == "raise":
            raise RuntimeError("predictor fault drill: raise")
        await self._ensure_loaded()
        loaded = self._loaded   # this batch is scored by one model, even if a swap lands meanwhile
        if loaded is None:
            raise PredictorUnavailable(self._load_error or "predictor not loaded")
        predictions = await asyncio.to_thread(self._score_sync, loaded, inputs, time.monotonic())
        self.batches += 1
        self.scored += len(inputs)
        return predictions

    def status(self) -> dict[str, Any]:
        loaded = self._loaded
        return {"loaded": loaded is not None, "version": loaded and loaded.version, "pid": os.getpid(),
                "runtime": loaded and loaded.runtime,
                "artifact_dir": loaded and str(loaded.artifact_dir), "load_s": loaded and loaded.load_s,
                "error": self._load_error,
                "swaps": self.swaps, "batches": self.batches, "scored": self.scored, "fault": self.settings.fault}

    async def check_health(self) -> None:
        """Healthy even without an artifact: unavailability is a served state (FCFS), not a crash."""
