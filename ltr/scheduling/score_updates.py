"""Scores that land after their request entered the engine: a one-way channel into the scheduler.

The ingress sends a request to its engine before the predictor has answered: the rank scheduler holds it
behind ranked work until its score lands (so the predictor's latency costs nothing when a seat is free),
and a request the ingress gave up waiting for sits at a neutral place until its own score comes. The
engine replica appends each score here, and the rank scheduler, which runs in vLLM's engine-core process,
reads what was appended once per step and re-ranks the request. A plain append-only file of JSON lines:
the two sides share a machine, and a line written with O_APPEND is never interleaved with another, so the
reader needs no locking and pays one read call per step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import IO, Any


@dataclass(frozen=True)
class ScoreUpdate:
    """What the scheduler learns about one request after it arrived.

    `score`: its place from now on (None: keep the one it has). `extra_args`: entries for the request's
    ``SamplingParams.extra_args`` that go with the score (what the served-traffic log records of the
    predictor's answer). `final`: no further update follows; False for the neutral score that releases a
    request whose own score is late and may still come."""

    request_id: str
    score: float | None
    extra_args: dict[str, Any] = field(default_factory=dict)
    final: bool = True


def append_score_update(path: str | os.PathLike, update: ScoreUpdate) -> None:
    """Append `update` (the engine replica's side)."""
    score = None if update.score is None or not math.isfinite(update.score) else float(update.score)
    line = json.dumps({"id": update.request_id, "score": score, "extra_args": update.extra_args,
                       "final": update.final}, separators=(",", ":"))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def _parse(line: str) -> ScoreUpdate | None:
    try:
        raw = json.loads(line)
        score = raw["score"]
        return ScoreUpdate(request_id=str(raw["id"]), score=None if score is None else float(score),
                           extra_args=dict(raw.get("extra_args") or {}), final=bool(raw.get("final", True)))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class ScoreUpdateReader:
    """Reads the updates appended to `path` since the last call (the scheduler's side); a missing file is
    empty, a half-written last line waits for the next call, a malformed line is skipped."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self._handle: IO[str] | None = None
        self._partial = ""

    def read(self) -> list[ScoreUpdate]:
        if self._handle is None:
            try:
                self._handle = open(self.path, encoding="utf-8")
            except FileNotFoundError:
                return []
        chunk = self._handle.read()
        if not chunk:
            return []
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        return [update for update in map(_parse, lines) if update is not None]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
