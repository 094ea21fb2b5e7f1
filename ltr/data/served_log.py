"""Served-traffic log: one line per finished request, the labels for retraining on the served model.

The predictor is trained on ShareGPT answers, but a deployment ranks its *own* model's answers. This log
records, for every finished request, what the predictor saw (a hash and lengths; the rendered text only
when the operator opts in), what it predicted, and how long the served model's answer really was.

Format: JSON Lines in gzip segments, ``served-<writer>-<pid>-<start>-<seq>.jsonl.gz``. Each writer process
owns its own segments, so several engine replicas (and vLLM engine-core processes) can share one folder
without locks. A segment is one gzip stream written as records arrive (compression costs a few µs per
record; there is no compression pause at rotation on the serving path), flushed every
``flush_interval_s`` and closed once ``segment_bytes`` of records went into it. After each rotation the
writer deletes the oldest closed segments in the folder, any writer's, until the folder fits
``max_total_bytes``. A crash loses at most the unflushed tail; `read_served_log` reads up to the last
complete line.

Where records come from: the rank scheduler sees each finished vLLM ``Request`` (output tokens, finish
reason, ``sampling_params.extra_args``); the ingress puts what only it knows into extra_args with
`record_extra_args`, and `record_from_request` turns the finished request into a `ServedRecord`.
Stdlib only: it runs inside vLLM's engine-core process, beside the scheduler plugin.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import socket
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

#: extra_args keys the ingress sets (`record_extra_args`) and `record_from_request` reads. The score itself
#: rides in ``ltr_score`` (`ltr.scheduling.engine.SCORE_KEY`).
VERSION_KEY = "ltr_predictor_version"
INPUT_HASH_KEY = "ltr_input_sha256"
INPUT_CHARS_KEY = "ltr_input_chars"
INPUT_TEXT_KEY = "ltr_input_text"
CONVERSATION_HASH_KEY = "ltr_conversation_sha256"
INPUT_MESSAGES_KEY = "ltr_input_messages"
SCORE_KEY = "ltr_score"   # = ltr.scheduling.engine.SCORE_KEY (kept import-free: no vLLM needed to read logs)

SEGMENT_PREFIX = "served-"
SEGMENT_SUFFIX = ".jsonl.gz"


def text_sha256(text: str) -> str:
    """The input hash: it joins records of the same prompt and splits the log deterministically."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _version_extra_args(predictor_version: str | None) -> dict[str, Any]:
    return {} if predictor_version is None else {VERSION_KEY: predictor_version}


def record_extra_args(text: str, predictor_version: str | None, log_text: bool | None,
                      conversation: str | None = None,
                      messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The extra_args a request carries for its record: the predictor's version always (`Prediction.version`;
    None: not the predictor's score), by which live ranking quality groups; with the served-traffic log on
    (`log_text` not None) what the log records as well (`log_extra_args`, the text itself if `log_text`)."""
    if log_text is None:
        return _version_extra_args(predictor_version)
    return log_extra_args(text, predictor_version, log_text, conversation, messages)


def log_extra_args(text: str, predictor_version: str | None, include_text: bool,
                   conversation: str | None = None,
                   messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The extra_args the ingress adds to a request so its log record is complete.

    `text` is what the predictor scored (the rendered conversation or the prompt). `predictor_version` is
    `Prediction.version` when the predictor's own answer placed the request, else None (neutral or
    overridden placement: that score says nothing about the predictor). The text itself is included only
    when the operator opted in (`include_text`), since it is the user's data. `conversation` is what the
    request's conversation is known by (`ltr.predictor.render.conversation_text`); its hash splits the log.
    `messages` is a chat's conversation (role and text of each message), logged with the text: whoever
    retrains renders it with the artifact being trained, so a turn the predictor never scored (logged by
    its last user message) and one scored by another artifact train on what that artifact will read.
    A late score's fields leave out `conversation` and `messages`: they join the ingress's, which keep them.
    """
    extra: dict[str, Any] = {INPUT_HASH_KEY: text_sha256(text), INPUT_CHARS_KEY: len(text),
                             **_version_extra_args(predictor_version)}
    if conversation is not None:
        extra[CONVERSATION_HASH_KEY] = text_sha256(conversation)
    if include_text:
        extra[INPUT_TEXT_KEY] = text
        if messages is not None:   # as JSON: vLLM's extra_args hold strings and numbers, not objects
            extra[INPUT_MESSAGES_KEY] = json.dumps(messages, ensure_ascii=False)
    return extra


@dataclass(frozen=True)
class ServedRecord:
    """One finished request. ``output_tokens`` is exact only when the model ended its answer itself."""

    time: float                      # unix seconds when the request finished
    model: str                       # served model name
    request_id: str
    finish_reason: str               # vLLM's: stop | length | abort | error | repetition
    output_tokens: int
    max_tokens: int | None
    prompt_tokens: int               # the served model's tokens
    score: float | None              # the score the request was ranked by (None: unscored)
    predictor_version: str | None    # None: the score was not the predictor's (neutral/override/none)
    input_sha256: str | None         # hash of the predictor's input text
    input_chars: int | None
    text: str | None = None          # the predictor's input text, only when opted in
    #: hash of what the request's conversation is known by (its first user message, or the prompt): the
    #: same for every turn, scored or not; None in logs written before it was recorded
    conversation_sha256: str | None = None
    #: a chat's messages (role, text), only when opted in; None for a completion and in older logs
    messages: list[dict[str, str]] | None = None

    @property
    def censored(self) -> bool:
        """Only "stop" is an answer the model ended; a capped, aborted or failed one is a lower bound."""
        return self.finish_reason != "stop"

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> ServedRecord:
        return cls(**{f.name: row.get(f.name) for f in fields(cls)})


def record_from_request(request: Any, model: str, now: float | None = None) -> ServedRecord:
    """The record of a finished vLLM ``Request`` (``vllm.v1.request.Request``; duck-typed, so reading
    and writing the log needs no vLLM). Call it where the scheduler frees a finished request."""
    params = request.sampling_params
    extra = (params.extra_args or {}) if params is not None else {}
    reason = request.get_finished_reason()
    if reason is None:
        raise ValueError(f"request {request.request_id} has not finished (status {request.status})")
    score = extra.get(SCORE_KEY)
    try:
        score = float(score) if score is not None and math.isfinite(float(score)) else None
    except (TypeError, ValueError):
        score = None
    chars = extra.get(INPUT_CHARS_KEY)
    return ServedRecord(
        time=time.time() if now is None else now, model=model, request_id=str(request.request_id),
        finish_reason=str(reason),
        output_tokens=int(request.num_output_tokens),
        max_tokens=None if params is None or params.max_tokens is None else int(params.max_tokens),
        prompt_tokens=int(request.num_prompt_tokens), score=score,
        predictor_version=extra.get(VERSION_KEY), input_sha256=extra.get(INPUT_HASH_KEY),
        input_chars=None if chars is None else int(chars), text=extra.get(INPUT_TEXT_KEY),
        conversation_sha256=extra.get(CONVERSATION_HASH_KEY),
        messages=json.loads(extra[INPUT_MESSAGES_KEY]) if INPUT_MESSAGES_KEY in extra else None)


@dataclass(frozen=True)
class ServedLogConfig:
    """Where and how much to log; off unless a directory is configured (`from_mapping(None)` is None)."""

    directory: str
    #: A segment is closed once this many bytes of records went into it (before compression: zlib holds
    #: back its output, so the bytes on disk lag; a closed segment is at most this big).
    segment_bytes: int = 32 * 2**20
    #: The folder is kept under this many bytes: oldest closed segments go first.
    max_total_bytes: int = 1024 * 2**20
    #: Seconds between flushes: how much a crash can lose, and how fresh a reader's view is.
    flush_interval_s: float = 5.0
    #: Names this writer's segments (with the pid); e.g. the engine replica's id.
    writer_id: str = ""

    def __post_init__(self) -> None:
        if not self.directory:
            raise ValueError("served_log.directory must be a non-empty path")
        if self.segment_bytes < 1024:
            raise ValueError(f"served_log.segment_bytes must be >= 1024, got {self.segment_bytes}")
        if self.max_total_bytes < self.segment_bytes:
            raise ValueError("served_log.max_total_bytes must be >= segment_bytes "
                             f"({self.max_total_bytes} < {self.segment_bytes})")
        if not self.flush_interval_s > 0:
            raise ValueError(f"served_log.flush_interval_s must be > 0, got {self.flush_interval_s}")
        if any(c in self.writer_id for c in "/\\\0"):
            raise ValueError(f"served_log.writer_id must not contain path separators: {self.writer_id!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> ServedLogConfig | None:
        """Validate a plain dict (a Serve config / additional_config section); None means logging is off."""
        if data is None:
            return None
        if not isinstance(data, Mapping):
            raise ValueError(f"served_log must be a mapping, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown served_log key(s) {unknown}; allowed: {allowed}")
        kinds = {"directory": (str, os.PathLike), "segment_bytes": int, "max_total_bytes": int,
                 "flush_interval_s": (int, float), "writer_id": str}
        for key, value in data.items():
            if isinstance(value, bool) or not isinstance(value, kinds[key]):
                raise ValueError(f"served_log.{key}: wrong type {type(value).__name__}")
        return cls(**{k: (str(v) if k == "directory" else v) for k, v in data.items()})


class ServedLogWriter:
    """Appends records to this process's current segment; buffered, no fsync (see the module docstring)."""

    def __init__(self, config: ServedLogConfig) -> None:
        self.config = config
        self.directory = Path(config.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        writer = config.writer_id or socket.gethostname()
        self._stem = f"{SEGMENT_PREFIX}{writer}-{os.getpid()}-{time.time_ns()}"
        self._seq = 0
        self._raw: IO[bytes] | None = None
        self._gz: gzip.GzipFile | None = None
        self._segment_written = 0
        self._last_flush = time.monotonic()
        self.records = 0
        self.segments_deleted = 0

    def _open(self) -> None:
        self._seq += 1
        path = self.directory / f"{self._stem}-{self._seq:05d}{SEGMENT_SUFFIX}"
        self._raw = open(path, "xb", buffering=64 * 1024)
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=1)
        self._segment_written = 0

    def write(self, record: ServedRecord) -> None:
        if self._gz is None:
            self._open()
        line = json.dumps(vars(record), ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"
        self._segment_written += self._gz.write(line.encode("utf-8"))
        self.records += 1
        if self._segment_written >= self.config.segment_bytes:
            self._close_segment()
            self._enforce_cap()
        elif time.monotonic() - self._last_flush >= self.config.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Make everything written so far readable (a zlib sync point plus a write call; no fsync)."""
        if self._gz is not None:
            self._gz.flush()
            self._raw.flush()
        self._last_flush = time.monotonic()

    def _close_segment(self) -> None:
        if self._gz is not None:
            self._gz.close()
            self._raw.close()
            self._gz = self._raw = None

    def _enforce_cap(self) -> None:
        """Delete the oldest closed segments (any writer's) until the folder fits max_total_bytes."""
        open_names = {f"{self._stem}-{self._seq:05d}{SEGMENT_SUFFIX}"} if self._gz is not None else set()
        segments = []
        for path in self.directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:   # another writer deleted it just now
                continue
            segments.append((st.st_mtime, path.name, st.st_size, path))
        total = sum(size for _, _, size, _ in segments)
        for _, name, size, path in sorted(segments):
            if total <= self.config.max_total_bytes:
                break
            if name in open_names:
                continue
            try:
                path.unlink()
                self.segments_deleted += 1
            except FileNotFoundError:
                pass
            total -= size

    def close(self) -> None:
        self._close_segment()


def segment_paths(path: str | os.PathLike) -> list[Path]:
    """A log's segments, each writer's in write order: a folder's served-*.jsonl.gz, or one file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no served-traffic log here")
    return sorted(path.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"))   # per writer: start time, then sequence


def _segment_lines(path: Path) -> Iterator[bytes]:
    """Complete lines of one gzip segment, also of one still being written or cut short by a crash (the
    gzip module refuses a stream without its trailer; zlib gives whatever decompresses)."""
    decompressor = zlib.decompressobj(wbits=31)
    pending = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(256 * 1024):
            while chunk:
                pending += decompressor.decompress(chunk)
                chunk = b""
                if decompressor.eof:   # a further gzip member follows (concatenated segments)
                    chunk, decompressor = decompressor.unused_data, zlib.decompressobj(wbits=31)
            *lines, pending = pending.split(b"\n")
            yield from lines
    # `pending` is a torn last line (or empty): dropped.


def read_served_log(path: str | os.PathLike) -> Iterator[ServedRecord]:
    """Every complete record of a log folder (or one segment), each writer's oldest segment first; a torn
    last line of a segment is skipped, a malformed complete line is an error naming the file and line."""
    for segment in segment_paths(path):
        for number, line in enumerate(_segment_lines(segment), start=1):
            if not line.strip():
                continue
            try:
                yield ServedRecord.from_json(json.loads(line))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{segment}:{number}: not a served-log record ({exc})") from exc
