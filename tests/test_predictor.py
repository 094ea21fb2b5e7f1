"""RankPredictor on real ShareGPT prompts: persistence, learning, calibration, CLI, shipped artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ltr.predictor import PredictorConfig, RankPredictor, fit_calibration, load_shipped_predictor
from ltr.predictor.evaluate import kendall_tau
from ltr.predictor.train import ExampleSplits, TrainConfig, load_examples, train_predictor


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
