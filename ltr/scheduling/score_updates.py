"""Scores that land after their request entered the engine: a one-way channel into the scheduler.

Under overload the ingress gives up waiting for the predictor and sends the request on at a neutral
place; the prediction still arrives a moment later. The engine replica appends it here, and the rank
scheduler, which runs in vLLM's engine-core process, reads what was appended once per step and re-ranks
the request. A plain append-only file: the two sides share a machine, and a line written with O_APPEND is
never interleaved with another, so the reader needs no locking and pays one read call per step.
"""

from __future__ import annotations

import os
from typing import IO


def append_score_update(path: str | os.PathLike, request_id: str, score: float) -> None:
    """Record that `request_id`'s predicted score is `score` (the engine replica's side)."""
    if "\t" in request_id or "\n" in request_id:
        raise ValueError(f"request id {request_id!r} contains a tab or newline")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{request_id}\t{float(score)!r}\n")


class ScoreUpdateReader:
    """Reads the lines appended to `path` since the last call (the scheduler's side); a missing file is
    empty, a half-written last line waits for the next call, a malformed line is skipped."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self._handle: IO[str] | None = None
        self._partial = ""

    def read(self) -> list[tuple[str, float]]:
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
        updates = []
        for line in lines:
            request_id, _, raw = line.partition("\t")
            try:
                updates.append((request_id, float(raw)))
            except ValueError:
                continue
        return updates

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
