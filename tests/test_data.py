"""ShareGPT loading: truncated-file parsing, clear errors, determinism, conversation-disjoint splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ltr.data import DataError, iter_sharegpt_records, read_trace, split_pairs, write_trace


def _record(cid: str, human: str = "hi", gpt: str = "hello") -> dict:
    return {"id": cid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def test_truncated_file_stops_at_the_cut(tmp_path: Path) -> None:
    body = ",\n".join(json.dumps(_record(f"c{i}_0")) for i in range(3))
    path = tmp_path / "cut.json"
    path.write_text("[" + body + ',\n{"id": "c3_0", "conversations": [{"from": "hu', encoding="utf-8")
    assert [r["id"] for r in iter_sharegpt_records(path)] == ["c0_0", "c1_0", "c2_0"]


def test_complete_file_reads_every_record(tmp_path: Path) -> None:
    path = tmp_path / "full.json"
    path.write_text(json.dumps([_record("a_0"), _record("b_1")]), encoding="utf-8")
    assert [r["id"] for r in iter_sharegpt_records(path)] == ["a_0", "b_1"]


def test_corrupt_record_in_the_middle_names_file_and_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("[" + json.dumps(_record("a_0")) + ', {"id": "b_0", "conversations": [}, '
                    + json.dumps(_record("c_0")) + "]", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: record 1"):
        list(iter_sharegpt_records(path))


def test_record_without_conversations_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "shape.json"
    path.write_text(json.dumps([_record("a_0"), {"id": "b_0"}]), encoding="utf-8")
    with pytest.raises(DataError, match="record 1"):
        list(iter_sharegpt_records(path))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.json"):
        list(iter_sharegpt_records(tmp_path / "nope.json"))


def test_real_sharegpt_pairs_are_deterministic_and_labelled(sharegpt_pairs, smollm2_path: Path) -> None:
    from ltr.data import load_pairs

    again = load_pairs(tokenizer_path=smollm2_path, use_cache=False)
    assert again == sharegpt_pairs
    assert len(sharegpt_pairs) > 10_000
    assert all(p.output_len > 0 and p.prompt_len > 0 for p in sharegpt_pairs)
    assert len({p.conv_id for p in sharegpt_pairs}) == len(sharegpt_pairs)


def test_splits_are_disjoint_by_conversation_and_stable(sharegpt_pairs) -> None:
    splits = split_pairs(sharegpt_pairs)
    bases = [{p.base_id for p in part} for part in (splits.train, splits.val, splits.test)]
    assert not (bases[0] & bases[1]) and not (bases[0] & bases[2]) and not (bases[1] & bases[2])
    assert sum(map(len, (splits.train, splits.val, splits.test))) == len(sharegpt_pairs)
    assert 0.07 < len(splits.test) / len(sharegpt_pairs) < 0.13
    assert split_pairs(list(reversed(sharegpt_pairs))).test == list(reversed(splits.test))


def test_trace_round_trip_and_bad_rows(sharegpt_pairs, tmp_path: Path) -> None:
    pairs = sharegpt_pairs[:5]
    path = write_trace(pairs, tmp_path / "trace.jsonl", scores=[0.5] * 5)
    rows = read_trace(path)
    assert [(r["prompt"], r["output_len"], r["score"]) for r in rows] == [(p.prompt, p.output_len, 0.5) for p in pairs]
    path.write_text(path.read_text() + '{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"trace\.jsonl: line 6 lacks \['output_len', 'prompt_len'\]"):
        read_trace(path)
