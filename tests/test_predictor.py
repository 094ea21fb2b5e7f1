"""RankPredictor on real ShareGPT prompts: persistence, learning, calibration, CLI, shipped artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ltr.predictor import PredictorConfig, RankPredictor, fit_calibration, load_shipped_predictor
from ltr.predictor.evaluate import kendall_tau
from ltr.predictor.train import ExampleSplits, TrainConfig, load_examples, mean_state, train_predictor


@pytest.fixture(scope="module")
def splits() -> ExampleSplits:
    return load_examples()


def test_save_load_round_trip_gives_identical_scores(tmp_path: Path, splits: ExampleSplits) -> None:
    torch.manual_seed(0)
    model = RankPredictor(PredictorConfig(finetune="lora", lora_r=4, lora_alpha=8, max_length=48))
    with torch.no_grad():  # LoRA B starts at zero; perturb every trained tensor so the round trip means something
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.config.calibration = {"scores": [-1.0, 0.0, 1.0], "tokens": [50.0, 200.0, 600.0]}
    prompts = [e.prompt for e in splits.test[:12]]
    before = model.score(prompts)
    model.save_pretrained(tmp_path / "p")
    loaded = RankPredictor.from_pretrained(tmp_path / "p")
    assert loaded.score(prompts) == before
    assert loaded.expected_tokens([-2.0, 0.5, 3.0]) == [50.0, 400.0, 600.0]
    assert set(loaded.trainable_state_dict()) == set(model.trainable_state_dict())


def test_short_training_raises_tau_above_untrained(splits: ExampleSplits) -> None:
    data = ExampleSplits(splits.train[:512], splits.val[:160], splits.test[:192])
    model_cfg = PredictorConfig(objective="listmle", finetune="frozen", max_length=64, dropout=0.0)
    torch.manual_seed(0)  # train_predictor seeds the same way: `untrained` is the trained model's initial state
    untrained = RankPredictor(PredictorConfig(**{**model_cfg.__dict__}))
    lengths = [e.output_len for e in data.test]
    prompts = [e.prompt for e in data.test]
    tau_before = kendall_tau(untrained.score(prompts), lengths)
    trained, history = train_predictor(model_cfg, TrainConfig(epochs=30, list_size=32, head_lr=3e-3, patience=30,
                                                              seed=0, progress=False), data)
    tau_after = kendall_tau(trained.score(prompts), lengths)
    print(f"untrained tau {tau_before:.3f} -> trained tau {tau_after:.3f}")
    assert tau_after > tau_before + 0.05, (tau_before, tau_after)
    assert tau_after > 0.15
    # The calibration fitted on val is monotone in the score and speaks in plausible token counts.
    grid = np.linspace(min(trained.config.calibration["scores"]) - 1, max(trained.config.calibration["scores"]) + 1, 50)
    tokens = trained.expected_tokens(grid.tolist())
    assert all(b >= a for a, b in zip(tokens, tokens[1:]))
    assert 10 < tokens[0] < tokens[-1] < 2000
    assert history["best_val_tau"] == pytest.approx(max(history["val_tau"]))


def test_fine_tuning_keeps_the_init_unless_an_epoch_ranks_validation_better(tmp_path: Path,
                                                                           splits: ExampleSplits) -> None:
    from dataclasses import replace

    data = ExampleSplits(splits.train[:256], splits.val[:160], splits.test[:8])
    model_cfg = PredictorConfig(objective="listmle", finetune="frozen", max_length=64, dropout=0.0)
    torch.manual_seed(0)
    RankPredictor(model_cfg).save_pretrained(tmp_path / "untrained")
    train_cfg = TrainConfig(epochs=12, list_size=32, head_lr=3e-3, patience=12, seed=0, progress=False)
    trained, learned = train_predictor(model_cfg, train_cfg, data, init=tmp_path / "untrained")
    assert learned["best_epoch"] > 0 and learned["best_val_tau"] > learned["init_val_tau"] + 0.05
    trained.save_pretrained(tmp_path / "trained")
    # Labels turned upside down: every epoch ranks validation worse, so the artifact comes back unchanged.
    upside_down = ExampleSplits([replace(e, output_len=5000 - e.output_len) for e in data.train], data.val, data.test)
    kept, history = train_predictor(model_cfg, replace(train_cfg, epochs=3, patience=3, head_lr=1e-2), upside_down,
                                    init=tmp_path / "trained")
    assert history["best_epoch"] == 0 and max(history["val_tau"]) < history["init_val_tau"]
    assert history["best_val_tau"] == pytest.approx(history["init_val_tau"])
    prompts = [e.prompt for e in data.val[:16]]
    assert kept.score(prompts) == pytest.approx(RankPredictor.from_pretrained(tmp_path / "trained").score(prompts))


def test_mean_state_averages_each_tensor_of_the_checkpoints() -> None:
    states = [{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])},
              {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([3.0])}]
    mean = mean_state(states)
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and torch.equal(mean["b"], torch.tensor([1.5]))


# Seeded, deterministic on CPU: the first setting's best epoch ranks validation better than the mean of the
# four, the second's (a head learning rate that makes every epoch jump) worse: both outcomes are exercised.
@pytest.mark.parametrize(("head_lr", "seed", "average_wins"), [(3e-3, 0, False), (1e-1, 1, True)])
def test_averaged_epochs_are_kept_only_where_they_rank_validation_better(splits: ExampleSplits, head_lr: float,
                                                                         seed: int, average_wins: bool) -> None:
    from dataclasses import replace

    data = ExampleSplits(splits.train[:256], splits.val[:160], splits.test[:8])
    model_cfg = PredictorConfig(objective="listmle", finetune="frozen", max_length=64, dropout=0.0)
    train_cfg = TrainConfig(epochs=4, list_size=32, head_lr=head_lr, patience=4, seed=seed, progress=False,
                            average_epochs=True)
    trained, history = train_predictor(model_cfg, train_cfg, data)
    averaged = history["averaged_val_tau"] > max(history["val_tau"])
    assert averaged == average_wins
    assert history["best_val_tau"] == pytest.approx(max(*history["val_tau"], history["averaged_val_tau"]))
    assert (history["best_epoch"] == "mean of epochs 1-4") == averaged
    # Without averaging, the same seed trains the same epochs: the average is the only new candidate.
    single, plain = train_predictor(model_cfg, replace(train_cfg, average_epochs=False), data)
    assert plain["val_tau"] == pytest.approx(history["val_tau"]) and "averaged_val_tau" not in plain
    prompts = [e.prompt for e in data.val[:16]]
    assert (trained.score(prompts) != pytest.approx(single.score(prompts))) == averaged


def test_fit_calibration_is_monotone_even_on_noisy_data() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=2000)
    y = np.exp(5 + 0.5 * s + rng.normal(scale=1.0, size=2000))
    cal = fit_calibration(s, y)
    assert cal["scores"] == sorted(cal["scores"])
    assert all(b >= a for a, b in zip(cal["tokens"], cal["tokens"][1:]))
    with pytest.raises(ValueError):
        fit_calibration([1.0, 2.0], [3.0, 4.0])


def test_shipped_artifact_loads_and_ranks_real_prompts(splits: ExampleSplits) -> None:
    model = load_shipped_predictor()
    meta = model.config.metadata
    assert "ltr train-predictor" in meta["command"] and meta["device"]
    model_dir = Path(__file__).resolve().parents[1] / "ltr" / "artifacts" / "predictor"
    assert sum(f.stat().st_size for f in model_dir.iterdir()) < 10 * 2**20
    sample = splits.test[:160]
    scores = model.score([e.prompt for e in sample])
    assert len(scores) == len(sample) and np.isfinite(scores).all()
    assert kendall_tau(scores, [e.output_len for e in sample]) > 0.3
    tokens = model.expected_tokens(scores)
    assert np.all(np.asarray(tokens) > 0)
    assert model.score([]) == []


def test_serving_variant_merges_the_adapters_and_keeps_the_scores(splits: ExampleSplits) -> None:
    prompts = [e.prompt for e in splits.test[:48]]
    trained = load_shipped_predictor()
    served = load_shipped_predictor().for_serving()
    assert any("lora" in name for name, _ in trained.backbone.named_modules())
    assert not any("lora" in name for name, _ in served.backbone.named_modules())
    assert np.allclose(served.score(prompts), trained.score(prompts), atol=1e-4)


@pytest.mark.parametrize("objective", ["listmle", "buckets"])
def test_onnx_runtime_scores_what_torch_scores(splits: ExampleSplits, objective: str) -> None:
    """The exported graph is the model: the same score per prompt as torch's forward pass, for prompts cut at
    the window, one token long, or in between, and for a bucket head (its expected bucket index)."""
    from ltr.predictor.onnx_runtime import OnnxRankPredictor

    if objective == "listmle":
        torch_model = load_shipped_predictor().for_serving(64)
    else:
        torch.manual_seed(0)
        torch_model = RankPredictor(PredictorConfig(objective="buckets", finetune="frozen", max_length=64))
    prompts = [e.prompt for e in splits.test[:24]] + ["hi", "long " * 400]
    onnx_model = OnnxRankPredictor(torch_model, threads=1)
    assert max(len(ids) for ids in torch_model.tokenize(prompts)) == 64
    assert np.allclose(onnx_model.score(prompts), torch_model.score(prompts, batch_size=1), atol=1e-4)
    assert onnx_model.config is torch_model.config
    with pytest.raises(TypeError, match="list of strings"):
        onnx_model.score("one prompt, not a list")


def test_eval_predictor_cli_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    from ltr.cli import main

    assert main(["eval-predictor", "--limit", "48"]) == 0
    out = capsys.readouterr().out
    assert "kendall_tau" in out and "prompt length" in out and "listmle/lora@512" in out


def test_bad_input_gives_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="predictor file missing"):
        RankPredictor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="objective"):
        PredictorConfig(objective="pairwise")
    with pytest.raises(ValueError, match="max_length"):
        PredictorConfig(max_length=4096)
    model = RankPredictor(PredictorConfig(finetune="frozen", max_length=32))
    with pytest.raises(TypeError, match="list of strings"):
        model.score("one prompt, not a list")
    with pytest.raises(ValueError, match="no calibration"):
        model.expected_tokens([0.0])


# ---- served traffic: retrain on the served model's own lengths (ltr.data.served_log) ------------------------

def _served_log(directory: Path, examples, text: bool = True, max_tokens: int = 256) -> list:
    """A served-traffic log of real prompts: answers at or past max_tokens are capped, every 9th aborted."""
    from ltr.data.served_log import ServedLogConfig, ServedLogWriter, ServedRecord, text_sha256

    writer = ServedLogWriter(ServedLogConfig(directory=str(directory), writer_id="test"))
    records = []
    for i, e in enumerate(examples):
        reason = "abort" if i % 9 == 4 else "length" if e.output_len >= max_tokens else "stop"
        tokens = min(e.output_len, max_tokens) if reason != "abort" else e.output_len // 3
        records.append(ServedRecord(time=float(i), model="SmolLM2-135M-Instruct", request_id=f"r{i}",
                                    finish_reason=reason, output_tokens=tokens, max_tokens=max_tokens,
                                    prompt_tokens=e.prompt_len, score=0.0, predictor_version="v0",
                                    input_sha256=text_sha256(e.prompt), input_chars=len(e.prompt),
                                    text=e.prompt if text else None))
        writer.write(records[-1])
    writer.close()
    return records


def test_served_log_splits_by_prompt_hash_and_handles_censored_labels(tmp_path: Path,
                                                                       splits: ExampleSplits) -> None:
    from ltr.predictor.train import load_served_examples, served_slice

    examples = splits.test[:150] + splits.test[:30]   # 30 prompts served twice
    records = _served_log(tmp_path / "log", examples)
    kept = load_served_examples(tmp_path / "log", censored="lower-bound", holdout=0.2, val_fraction=0.2)
    dropped = load_served_examples(tmp_path / "log", censored="drop", holdout=0.2, val_fraction=0.2)
    test_texts = {e.prompt for e in kept.test}
    assert test_texts.isdisjoint(e.prompt for e in kept.train + kept.val)   # a repeated prompt stays on one side
    assert {r.text for r in records if served_slice(r.input_sha256) < 0.2} == test_texts
    assert len(kept.test) == sum(served_slice(r.input_sha256) < 0.2 for r in records)  # test keeps aborts
    assert any(e.censored for e in kept.test) and any(e.censored for e in kept.train)
    assert not any(e.censored for e in dropped.train + dropped.val) and dropped.test == kept.test
    labelled = [r for r in records if served_slice(r.input_sha256) >= 0.2 and r.finish_reason != "abort"]
    assert len(kept.train) + len(kept.val) == len(labelled)
    assert max(e.output_len for e in kept.train) == 256

    _served_log(tmp_path / "hashes", splits.test[:20], text=False)
    with pytest.raises(ValueError, match="only hashes .* opts in"):
        load_served_examples(tmp_path / "hashes")


def test_served_log_keeps_each_conversation_in_one_slice_however_its_turns_were_scored(tmp_path: Path) -> None:
    """A scored turn is logged by what the predictor read (the rendered conversation), a turn sent unscored by
    its last user message: two hashes for one conversation. The split goes by the conversation's own."""
    from ltr.data.served_log import ServedLogConfig, ServedLogWriter, ServedRecord, text_sha256
    from ltr.predictor.train import load_served_examples

    def write(directory: Path, with_conversation: bool) -> None:
        writer = ServedLogWriter(ServedLogConfig(directory=str(directory), writer_id="test"))
        for i in range(120):
            first, later = f"conversation {i} opens", f"and asks again ({i})"
            scored = f"<|im_start|>user\n{first}<|im_end|>\n<|im_start|>user\n{later}<|im_end|>"
            for j, text in enumerate((scored, later)):
                writer.write(ServedRecord(
                    time=float(i), model="m", request_id=f"r{i}-{j}", finish_reason="stop", output_tokens=5 + i,
                    max_tokens=256, prompt_tokens=10, score=0.0 if j == 0 else None,
                    predictor_version="v0" if j == 0 else None, input_sha256=text_sha256(text),
                    input_chars=len(text), text=text,
                    conversation_sha256=text_sha256(first) if with_conversation else None))
        writer.close()

    def sides_of_each_conversation(directory: Path) -> list[set[str]]:
        splits = load_served_examples(directory, holdout=0.2, val_fraction=0.1)
        side_of = {e.prompt: side for side in ("train", "val", "test") for e in getattr(splits, side)}
        return [{side_of[t] for t in side_of if f"({i})" in t} for i in range(120)]

    write(tmp_path / "log", with_conversation=True)
    assert all(len(sides) == 1 for sides in sides_of_each_conversation(tmp_path / "log"))
    write(tmp_path / "old-log", with_conversation=False)   # a log from before the key: by input hash
    assert sum(len(sides) == 2 for sides in sides_of_each_conversation(tmp_path / "old-log")) > 20


def test_a_logged_chat_trains_on_what_the_trained_artifact_reads_scored_or_not(tmp_path: Path,
                                                                             smollm2_path: Path) -> None:
    """A chat turn the predictor scored is logged with what the *served* artifact read, one it never scored
    with its last user message; with its messages logged, the retraining reads both as the artifact being
    trained will read them when it serves them (`RankPredictor.chat_input`)."""
    from functools import partial

    from transformers import AutoTokenizer

    from ltr.data.served_log import ServedLogConfig, ServedLogWriter, ServedRecord, text_sha256
    from ltr.predictor.model import default_backbone_path
    from ltr.predictor.render import chat_input
    from ltr.predictor.train import load_served_examples

    template = AutoTokenizer.from_pretrained(smollm2_path).chat_template
    encoder = AutoTokenizer.from_pretrained(default_backbone_path())
    served = partial(chat_input, chat_template=template, tokenizer=encoder, max_length=24)
    trained = partial(chat_input, chat_template=template, tokenizer=encoder, max_length=96)
    writer = ServedLogWriter(ServedLogConfig(directory=str(tmp_path), writer_id="test"))
    conversations = {}
    for i in range(60):
        messages = [{"role": "user", "content": f"Tell me about topic {i}, at some length please."},
                    {"role": "assistant", "content": "Here it is. " * 6},
                    {"role": "user", "content": f"And what follows from topic {i}?"}]
        text, version = (served(messages), "v0") if i % 2 else (messages[-1]["content"], None)
        conversations[text] = messages
        writer.write(ServedRecord(time=float(i), model="m", request_id=f"r{i}", finish_reason="stop",
                                  output_tokens=5 + i, max_tokens=256, prompt_tokens=40, score=None,
                                  predictor_version=version, input_sha256=text_sha256(text),
                                  input_chars=len(text), text=text,
                                  conversation_sha256=text_sha256(messages[0]["content"]), messages=messages))
    writer.write(ServedRecord(time=60.0, model="m", request_id="c", finish_reason="stop", output_tokens=3,
                              max_tokens=256, prompt_tokens=4, score=None, predictor_version=None,
                              input_sha256=text_sha256("a completion"), input_chars=12, text="a completion"))
    writer.close()

    def every(splits) -> list:
        return splits.train + splits.val + splits.test

    as_logged = every(load_served_examples(tmp_path, holdout=0.2, val_fraction=0.2))
    assert {e.prompt for e in as_logged} == {*conversations, "a completion"}
    as_trained = every(load_served_examples(tmp_path, holdout=0.2, val_fraction=0.2, read_chat=trained))
    assert sorted(e.prompt for e in as_trained) == sorted([*(trained(m) for m in conversations.values()),
                                                           "a completion"])
    assert all(trained(m) != t for t, m in conversations.items())   # neither logged input is what it reads


@pytest.mark.parametrize("censored", ["lower-bound", "risk-set", "known-pairs"])
def test_train_and_eval_predictor_on_a_served_log(tmp_path: Path, splits: ExampleSplits, censored: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from safetensors.torch import load_file

    from ltr.cli import main
    from ltr.predictor.model import shipped_artifact_dir

    short = [e for e in splits.test if len(e.prompt) < 400][:120]   # keeps the CPU training step short
    _served_log(tmp_path / "log", short)
    out = tmp_path / "retrained"
    with pytest.raises(SystemExit, match="needs --output"):
        main(["train-predictor", "--data", str(tmp_path / "log")])
    with pytest.raises(SystemExit, match="--lora-r 8 .the artifact has 32"):   # a weight shape: refused
        main(["train-predictor", "--data", str(tmp_path / "log"), "--init", str(shipped_artifact_dir()),
              "--lora-r", "8", "--output", str(out)])
    assert main(["train-predictor", "--data", str(tmp_path / "log"), "--init", str(shipped_artifact_dir()),
                 "--epochs", "1", "--list-size", "8", "--holdout", "0.25", "--val-fraction", "0.25",
                 "--max-length", "128", "--censored", censored, "--average-epochs", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["max_length"] == 128   # the input window follows the flag; the shapes stay the artifact's
    meta = config["metadata"]
    assert "--data=" in meta["command"] and "--init=" in meta["command"] and f"--censored={censored}" in meta["command"]
    assert meta["history"]["train_config"]["censored"] == censored
    assert "--average-epochs" in meta["command"]   # one epoch: its mean is itself
    assert meta["history"]["averaged_val_tau"] == pytest.approx(meta["history"]["val_tau"][0])
    assert meta["history"]["init"] == str(shipped_artifact_dir()) and meta["test"]["censored"] >= 1
    assert meta["history"]["n_train"] >= 40
    shipped, retrained = (load_file(str(d / "weights.safetensors")) for d in (shipped_artifact_dir(), out))
    assert set(shipped) == set(retrained) and any(not torch.equal(shipped[k], retrained[k]) for k in shipped)
    capsys.readouterr()
    assert main(["eval-predictor", "--data", str(tmp_path / "log"), "--holdout", "0.25",
                 "--val-fraction", "0.25", "--predictor", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "served log" in printed and "censored" in printed and "listmle/lora@128" in printed
    assert f"{meta['test']['kendall_tau']:.4f}" in printed   # the same held-out slice as training's test


def test_train_and_eval_predictor_read_a_logged_chat_with_the_artifacts_own_renderer(
        tmp_path: Path, smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train-predictor --data` reads chats as the model it trains will (the --init artifact's template, the
    run's window); `eval-predictor --data` as the artifact it scores does."""
    import json
    import shutil

    from transformers import AutoTokenizer

    import ltr.predictor.train as train
    from ltr.cli import main
    from ltr.predictor.model import CONFIG_NAME, RankPredictor, default_backbone_path, shipped_artifact_dir
    from ltr.predictor.render import chat_input

    template = AutoTokenizer.from_pretrained(smollm2_path).chat_template
    chat_dir = tmp_path / "chat"
    shutil.copytree(shipped_artifact_dir(), chat_dir)
    config = json.loads((chat_dir / CONFIG_NAME).read_text())
    (chat_dir / CONFIG_NAME).write_text(json.dumps({**config, "chat_template": template}))
    messages = [{"role": "user", "content": "An old question " * 40}, {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": "A new one?"}]
    renderers = []

    class Read(Exception):
        pass

    def load(*args, read_chat=None, **kwargs):
        renderers.append(read_chat)
        raise Read

    monkeypatch.setattr(train, "load_served_examples", load)
    with pytest.raises(Read):
        main(["train-predictor", "--data", str(tmp_path), "--init", str(chat_dir), "--max-length", "64",
              "--output", str(tmp_path / "out")])
    with pytest.raises(Read):
        main(["eval-predictor", "--data", str(tmp_path), "--predictor", str(chat_dir)])
    encoder = AutoTokenizer.from_pretrained(default_backbone_path())
    assert renderers[0](messages) == chat_input(messages, template, encoder, 64) != messages[-1]["content"]
    assert renderers[1](messages) == RankPredictor.from_pretrained(chat_dir).chat_input(messages)
    assert renderers[1](messages) != renderers[0](messages)   # its own window (512), not the run's


@pytest.mark.parametrize("rule", ["risk-set", "known-pairs"])
def test_a_censor_aware_rule_trains_on_its_loss(rule: str) -> None:
    from ltr.predictor.losses import known_pairs_loss, risk_set_loss
    from ltr.predictor.train import _Objective

    loss = {"risk-set": risk_set_loss, "known-pairs": known_pairs_loss}[rule]
    g = torch.Generator().manual_seed(0)
    raw, lengths = torch.randn(8, generator=g), torch.randint(1, 300, (8,), generator=g)
    censored = lengths >= 200
    objective = _Objective(PredictorConfig(), lengths.numpy().astype(float), g, censored=rule)
    assert objective(raw, lengths, censored, 4) == loss(raw.view(2, 4), lengths.view(2, 4).float(),
                                                        censored.view(2, 4))
    with pytest.raises(ValueError, match=f"lower bounds .{rule}. need the listmle objective, not 'regression'"):
        _Objective(PredictorConfig(objective="regression"), lengths.numpy().astype(float), g, censored=rule)
    with pytest.raises(ValueError, match="censored must be one of lower-bound, drop, risk-set, known-pairs, "
                                         "not 'risk'"):
        TrainConfig(censored="risk")
