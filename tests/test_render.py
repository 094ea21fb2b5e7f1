"""Every-turn data and the predictor's input renderer (ltr.data.conversations, ltr.predictor.render)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ltr.data.conversations import (Turn, asks_to_continue, conversation_key, is_error_answer, load_turns,
                                    split_turns)
from ltr.predictor.render import chat_input, conversation_text, last_user_text


@pytest.fixture(scope="module")
def served_tokenizer(smollm2_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def _load_encoder_tokenizer():
    from transformers import AutoTokenizer

    from ltr.predictor.model import default_backbone_path

    return AutoTokenizer.from_pretrained(default_backbone_path())


@pytest.fixture(scope="module")
def encoder_tokenizer():
    return _load_encoder_tokenizer()


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)   # with [CLS]/[SEP], as the predictor tokenizes


def test_cut_from_the_left_keeps_the_last_user_message_whole(served_tokenizer, encoder_tokenizer) -> None:
    last = "Write a haiku about the harbour at dawn."
    messages = [{"role": "user", "content": "alpha " * 300}, {"role": "assistant", "content": "omega " * 300},
                {"role": "user", "content": last}]
    text = chat_input(messages, served_tokenizer.chat_template, encoder_tokenizer, 64)
    assert last in text
    assert "omega" in text and "alpha" not in text       # the oldest history went first
    assert _count(encoder_tokenizer, text) <= 64
    # a last message longer than the window: its beginning is what is kept, nothing of the history
    long_last = " ".join(f"word{i}" for i in range(400))
    text = chat_input(messages[:2] + [{"role": "user", "content": long_last}], served_tokenizer.chat_template,
                      encoder_tokenizer, 64)
    assert text.startswith("word0") and "omega" not in text and _count(encoder_tokenizer, text) <= 64
    # short conversations are rendered whole, generation prompt included
    short = chat_input(messages[2:], served_tokenizer.chat_template, encoder_tokenizer, 512)
    assert short == served_tokenizer.apply_chat_template(messages[2:], tokenize=False, add_generation_prompt=True)


def test_measuring_a_long_conversation_warns_of_no_indexing_error(
        served_tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    """The renderer tokenizes more than the encoder takes on purpose, to measure; the encoder's
    "will result in indexing errors" warning would send operators after a bug that is not there."""
    import logging

    fresh = _load_encoder_tokenizer()   # it warns once per instance
    messages = [{"role": "user", "content": "alpha " * 1500}, {"role": "user", "content": "Why?"}]
    logger = logging.getLogger("transformers")   # does not propagate to the root, where caplog listens
    logger.addHandler(caplog.handler)
    try:
        text = chat_input(messages, served_tokenizer.chat_template, fresh, 512)
    finally:
        logger.removeHandler(caplog.handler)
    assert "Why?" in text and _count(fresh, text) <= 512     # it did measure, and cut
    assert not [r for r in caplog.records if "sequence length" in r.getMessage()]


def test_prompt_trained_artifact_scores_the_last_user_message(encoder_tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "sec"},
                                                                                   {"type": "text", "text": "ond"}]}]
    assert chat_input(messages, "", encoder_tokenizer, 512) == "second" == last_user_text(messages)
    with pytest.raises(ValueError, match="user message"):
        last_user_text([{"role": "system", "content": "x"}, {"role": "user", "content": "  "}])


def test_training_and_request_messages_give_the_same_input(served_tokenizer, encoder_tokenizer) -> None:
    """A turn from the data and the same conversation as an OpenAI request body (content parts,
    `developer` role for system) are one predictor input."""
    turn = Turn("c1", 1, (("system", "Be brief."), ("user", "hi"), ("assistant", "hello")), "tell me more", "x", 1)
    request = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text",
                                                                                           "text": "hi"}]},
               {"role": "assistant", "content": "hello"}, {"role": "user", "content": "tell me more"}]
    template = served_tokenizer.chat_template
    assert chat_input(turn.messages(), template, encoder_tokenizer, 128) == \
        chat_input(request, template, encoder_tokenizer, 128)


def test_hygiene_rules() -> None:
    for bad in ("", "\u200b", "  !  ", "Network error", "Too many requests in 1 hour. Try again later."):
        assert is_error_answer(bad), bad
    for good in ("Yes.", "I'm sorry, but I can't help with that.", "Network errors happen when " + "x" * 100):
        assert not is_error_answer(good), good
    for ask in ("continue", "Please continue.", "keep going", "go on from the last line", "more", "Continue writing please"):
        assert asks_to_continue(ask), ask
    for other in ("Can you continue the analysis with a focus on cost and explain each of the risks in detail?",
                  "Thank you", "what next year?"):
        assert not asks_to_continue(other), other


def _record(cid: str, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": who, "value": text} for who, text in turns]}


def test_turns_carry_history_and_cut_off_answers(tmp_path: Path, smollm2_path: Path) -> None:
    source = tmp_path / "sharegpt.json"
    records = [_record("a_0", ("human", "Write a story"), ("gpt", "Once upon"), ("human", "continue"),
                       ("gpt", "a time."), ("human", "Thanks! Now a poem"), ("gpt", "Roses")),
               _record("b_0", ("gpt", "orphan answer"), ("human", "Why?"), ("gpt", "Because.")),
               _record("c_0", ("human", "hi"), ("system", "odd"), ("human", "later"), ("gpt", "never used"))]
    source.write_text(json.dumps(records)[:-1] + ", {\"id\": \"trunc", encoding="utf-8")   # truncated tail
    turns = load_turns(source, smollm2_path, use_cache=False)
    assert [(t.conv_id, t.index, t.continued) for t in turns] == [("a_0", 0, True), ("a_0", 1, False),
                                                                 ("a_0", 2, False), ("b_0", 0, False)]
    assert turns[2].history == (("user", "Write a story"), ("assistant", "Once upon"), ("user", "continue"),
                                ("assistant", "a time."))
    assert turns[3].history == (("assistant", "orphan answer"),)
    assert all(t.output_len > 0 for t in turns)


def test_split_keeps_conversations_and_inputs_on_one_side() -> None:
    turns = []
    for i in range(400):
        history = (("user", f"question {i}"), ("assistant", "answer"))
        turns.append(Turn(f"conv{i}_0", 0, (), f"question {i}", "answer", 3))
        turns.append(Turn(f"conv{i}_1", 1, history, "and then?", "more words", 4))   # chunk of the same base id
        # the same first question reposted in another conversation (case and spacing differ)
        turns.append(Turn(f"dup{i}_0", 0, (), f"Question   {i}", "other answer", 5))
    splits, report = split_turns(turns)
    sides = {"train": splits.train, "val": splits.val, "test": splits.test}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not {t.base_id for t in sides[a]} & {t.base_id for t in sides[b]}
        assert not {conversation_key(t) for t in sides[a]} & {conversation_key(t) for t in sides[b]}
    assert report.duplicate_across_splits > 0
    assert sum(report.kept.values()) + report.duplicate_across_splits == len(turns)
    assert all(len(side) for side in sides.values())


def test_train_predictor_on_every_turn_gives_an_artifact_that_scores_chats_as_trained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], served_tokenizer) -> None:
    import ltr.data.conversations as conversations
    from ltr.cli import main
    from ltr.predictor import RankPredictor
    from ltr.predictor.train import load_examples, load_turn_examples

    real_split = conversations.split_turns

    def small_split(turns, *args, **kwargs):   # a slice of each side keeps the CPU run short
        splits, report = real_split(turns, *args, **kwargs)
        return type(splits)(splits.train[:96], splits.val[:64], splits.test[:64]), report

    monkeypatch.setattr(conversations, "split_turns", small_split)
    out = tmp_path / "turns"
    assert main(["train-predictor", "--turns", "--finetune", "frozen", "--max-length", "64", "--epochs", "1",
                 "--list-size", "32", "--output", str(out)]) == 0
    assert "64 test turns); first-turn test tau" in capsys.readouterr().out
    model = RankPredictor.from_pretrained(out)
    meta = model.config.metadata
    assert "--turns" in meta["command"] and meta["first_turn_test"]["n"] == len(load_examples().test)
    assert model.config.chat_template == served_tokenizer.chat_template and model.config.max_length == 64
    # What training scored for each test turn is what the artifact builds from that chat request.
    data, _ = load_turn_examples(model.tokenizer, 64)
    turns = conversations.split_turns(conversations.load_turns())[0].test
    later = [i for i, t in enumerate(turns) if t.history]
    assert later and all(data.test[i].prompt == model.chat_input(turns[i].messages()) for i in range(len(turns)))
    cut = [i for i in later if len(model.tokenizer(data.test[i].prompt).input_ids) >= 60]
    # Cut from the left: the last user message is kept from its start (whole when it fits the window).
    assert cut and all(turns[i].prompt.strip()[:30] in data.test[i].prompt for i in cut)
    assert any(data.test[i].prompt.rstrip().endswith("assistant") and not data.test[i].prompt.startswith("<|im_start|>")
               for i in cut)


def test_every_turn_of_a_conversation_is_known_by_one_text() -> None:
    """The served-traffic log splits by it: a later turn, scored or not, stays with the conversation's first."""
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  "},
             {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}]
    later = [*first, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    assert conversation_text(first) == conversation_text(later) == "Name a color."
    assert conversation_text("Once upon a time") == "Once upon a time"      # a completion: its prompt
    assert conversation_text([{"role": "system", "content": "Only a system message."}]) == ""


def test_the_device_bundle_holds_each_turn_as_the_artifact_reads_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`predictor_quality.py pack-turns` renders the every-turn data here for a GPU run that has neither the
    dataset nor the backbone: what travels must be what a chat-template artifact reads for each request."""
    import sys

    import torch

    from ltr.predictor import PredictorConfig, RankPredictor
    from ltr.predictor.train import load_examples

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import predictor_quality

    limit = 470   # validation turn 461's input holds a U+2028, at which str.splitlines() would cut a JSON line
    parts = tmp_path / "parts"
    monkeypatch.setattr(sys, "argv", ["predictor_quality.py", "pack-turns", "--out", str(parts), "--limit", str(limit),
                                      "--max-length", "64", "--part-mb", "16"])
    assert predictor_quality.main() == 0
    names = sorted(p.name for p in parts.iterdir())
    assert len(names) > 1 and all(n.startswith("bundle.tar.xz.") for n in names)   # cut to travel in parts
    lost = (parts / names[0]).read_bytes()
    (parts / names[0]).unlink()   # as on a machine that got only the later call's part
    with pytest.raises(SystemExit, match=f"missing {names[0]}"):
        predictor_quality.unpack_bundle(parts, tmp_path / "incomplete")
    (parts / names[0]).write_bytes(lost)
    root = predictor_quality.unpack_bundle(parts, tmp_path / "unpacked")
    data, later, sets, meta = predictor_quality.read_bundle(root)
    backbone = root / predictor_quality.BUNDLE_MEMBER / "minilm"
    model = RankPredictor(PredictorConfig(finetune="frozen", max_length=64, chat_template=meta["chat_template"]),
                          backbone_path=backbone)
    here = RankPredictor(PredictorConfig(finetune="frozen"))
    # The fp16 backbone that travels is the model the predictor builds here (it rounds to fp16 itself).
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                 here.backbone.state_dict().values()))
    turns = split_turns(load_turns())[0]
    for side in ("train", "val", "test"):
        expected = getattr(turns, side)[:limit]
        got = getattr(data, side)
        assert [e.prompt for e in got] == [model.chat_input(t.messages()) for t in expected]
        assert [e.output_len for e in got] == [t.output_len for t in expected]
    assert later.tolist() == [bool(t.history) for t in turns.test[:limit]] and later.any() and not later.all()
    assert [e.prompt for e in sets["later_test_last_message"]] == [t.prompt for t in turns.test[:limit] if t.history]
    first = load_examples().test[:limit]
    assert [e.prompt for e in sets["first_turn_prompt"]] == [e.prompt for e in first]
    assert [e.prompt for e in sets["first_turn_chat"]] == [
        model.chat_input([{"role": "user", "content": e.prompt}]) for e in first]
