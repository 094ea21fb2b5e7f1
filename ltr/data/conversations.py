"""Every human->gpt turn of ShareGPT with the conversation before it, label hygiene, a leak-free split.

A chatbot's requests are mostly later turns whose answer depends on the conversation, so the predictor
is trained and evaluated on each turn *with its history*, rendered the way the server will see it
(`ltr.predictor.render`). Labels are answer lengths in the served model's tokens. Three hygiene rules
remove labels that do not measure how long the model would answer (counts in `HygieneReport`):

- an empty or scrape-error answer ("", zero-width space, "Network error", "Too many requests ...");
- a cut-off answer: the next human turn only asks to continue ("continue", "go on", "keep going"), so
  the recorded length is a lower bound of the answer the user wanted;
- a duplicated turn: the same conversation so far (whitespace and case folded) in a conversation of
  another split side; it is dropped from train/val so no predictor input is on both sides.

The split is `split_pairs`'s: by base conversation id hash, so the first-turn test set stays the one
every earlier number was measured on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ltr.data.sharegpt import (DataError, Splits, default_sharegpt_path, iter_sharegpt_records, split_side,
                               write_cache)
from ltr.models import cache_dir

_TURNS_FORMAT = 1
_ROLES = {"human": "user", "gpt": "assistant"}
_INVISIBLE = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_ERROR_ANSWER = re.compile(r"!|(network error|too many requests in 1 hour|an error occurred|error in body stream|"
                           r"something went wrong).{0,60}", re.IGNORECASE | re.DOTALL)
_CONTINUE_REQUEST = re.compile(r"(please\s+)?(continue|keep going|go on)\b.{0,40}|more|next", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Turn:
    """One human->gpt exchange with the conversation before it (`history`: (role, text), oldest first)."""

    conv_id: str
    index: int                       # 0 = the conversation's first user turn
    history: tuple[tuple[str, str], ...]
    prompt: str                      # this user turn's text
    answer: str
    output_len: int                  # served-model tokens of the answer
    continued: bool = False          # the next user turn asks to continue: `output_len` is a lower bound

    @property
    def base_id(self) -> str:
        return self.conv_id.split("_", 1)[0]

    def messages(self) -> list[dict[str, str]]:
        """OpenAI-style messages up to and including this user turn (what a chat request carries)."""
        return [{"role": role, "content": text} for role, text in self.history] + \
            [{"role": "user", "content": self.prompt}]


@dataclass
class HygieneReport:
    """How many turns each rule removed, and what is left per split side."""

    turns: int = 0
    error_or_empty: int = 0
    continued: int = 0
    duplicate_across_splits: int = 0
    kept: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def is_error_answer(answer: str) -> bool:
    """Empty (after invisible characters) or a scraper's error message instead of an answer."""
    text = _INVISIBLE.sub("", answer).strip()
    return not text or _ERROR_ANSWER.fullmatch(text) is not None


def asks_to_continue(user_text: str) -> bool:
    """A short user turn that only asks for more of the previous answer."""
    text = _INVISIBLE.sub("", user_text).strip()
    return len(text) <= 60 and _CONTINUE_REQUEST.fullmatch(text) is not None


def hygiene_rule(turn: Turn) -> str | None:
    """The first rule that removes a turn's label ("error_or_empty", "continued"; `HygieneReport` counts them
    under these names), or None for a clean label. Duplicates depend on the split: `split_turns`."""
    if is_error_answer(turn.answer):
        return "error_or_empty"
    return "continued" if turn.continued else None


def _record_turns(record: dict) -> Iterable[tuple[int, tuple[tuple[str, str], ...], str, str, bool]]:
    """(index, history, prompt, answer, continued) of every human->gpt exchange in a record.

    A conversation with another role (system, bing, ...) or a non-text value ends where it appears:
    later turns would be rendered with a history the server never sees.
    """
    history: list[tuple[str, str]] = []
    turns = record["conversations"]
    index = 0
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            return
        role = _ROLES[turn["from"]]
        nxt = turns[i + 1] if i + 1 < len(turns) else None
        if role == "user" and isinstance(nxt, dict) and nxt.get("from") == "gpt" and isinstance(nxt.get("value"), str):
            after = turns[i + 2] if i + 2 < len(turns) else None
            continued = isinstance(after, dict) and after.get("from") == "human" \
                and isinstance(after.get("value"), str) and asks_to_continue(after["value"])
            if turn["value"].strip():
                yield index, tuple(history), turn["value"], nxt["value"], continued
            index += 1
        history.append((role, turn["value"]))


def _cache_path(source: Path, tokenizer_path: Path) -> Path:
    key = hashlib.sha256(f"{_TURNS_FORMAT}|{source.resolve()}|{source.stat().st_size}|"
                         f"{Path(tokenizer_path).resolve()}".encode()).hexdigest()[:16]
    return cache_dir() / "data" / f"sharegpt-turns-{key}.jsonl"


def load_turns(source: Path | None = None, tokenizer_path: Path | None = None, use_cache: bool = True) -> list[Turn]:
    """Every human->gpt turn in file order (no hygiene applied), answers counted in served-model tokens."""
    from transformers import AutoTokenizer

    from ltr.models import prepare_model

    source = Path(source) if source else default_sharegpt_path()
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else prepare_model()
    cached = _cache_path(source, tokenizer_path)
    if use_cache and cached.is_file():
        rows = (json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines())
        return [Turn(**{**row, "history": tuple(tuple(h) for h in row["history"])}) for row in rows]
    raw = [(record["id"], *turn) for record in iter_sharegpt_records(source) for turn in _record_turns(record)]
    if not raw:
        raise DataError(f"{source}: no human->gpt turns found")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    answer_ids = tokenizer([answer for *_, answer, _ in raw], add_special_tokens=False)["input_ids"]
    turns = [Turn(cid, index, history, prompt, answer, len(ids), continued)
             for (cid, index, history, prompt, answer, continued), ids in zip(raw, answer_ids)]
    if use_cache:
        write_cache(cached, turns)
    return turns


def conversation_key(turn: Turn) -> str:
    """The conversation so far with whitespace and case folded: equal keys = the same predictor input."""
    text = "\x1e".join(f"{role}\x1f{body}" for role, body in (*turn.history, ("user", turn.prompt)))
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def split_turns(turns: Sequence[Turn], val_fraction: float = 0.1,
                test_fraction: float = 0.1) -> tuple[Splits, HygieneReport]:
    """Clean turns split by base conversation id (as `split_pairs`), duplicates kept off two sides.

    Test keeps every clean turn of its conversations; a val turn whose input also occurs in test, or a
    train turn whose input occurs in test or val, is dropped.
    """
    report = HygieneReport(turns=len(turns))
    sides: dict[str, list[Turn]] = {"train": [], "val": [], "test": []}
    for turn in turns:
        rule = hygiene_rule(turn)
        if rule is not None:
            setattr(report, rule, getattr(report, rule) + 1)
        else:
            sides[split_side(turn.base_id, val_fraction, test_fraction)].append(turn)
    seen: set[str] = set()
    for side in ("test", "val", "train"):
        keys = [conversation_key(t) for t in sides[side]]
        kept = [t for t, k in zip(sides[side], keys) if k not in seen]
        report.duplicate_across_splits += len(sides[side]) - len(kept)
        seen.update(keys)
        sides[side] = kept
    report.kept = {side: len(ts) for side, ts in sides.items()}
    return Splits(sides["train"], sides["val"], sides["test"]), report


def turn_index_counts(turns: Iterable[Turn]) -> dict[str, int]:
    """Turns without history (what a first-turn predictor was trained on) vs turns with history."""
    counts = Counter("later" if t.history else "first" for t in turns)
    return {"first": counts["first"], "later": counts["later"]}
