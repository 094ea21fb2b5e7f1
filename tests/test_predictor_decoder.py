"""predictor_decoder's split forward pass: the cached bottom layers plus the trained top layers must be the
model, so the partial fine-tune trains on what a whole forward pass would give."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import predictor_decoder  # noqa: E402


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_bottom_then_top_layers_give_the_whole_models_states_under_right_padding(tiny_model_path: Path) -> None:
    model = _model(tiny_model_path)
    seqs = [[5, 17, 301, 9, 44, 12], [88, 3, 7]]
    ids, mask = predictor_decoder.right_padded(seqs)
    lower = predictor_decoder.layer_slice(model, 0, 1)
    upper = predictor_decoder.layer_slice(model, 1, 2)
    with torch.no_grad():
        below = lower(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        above = upper(inputs_embeds=below, attention_mask=mask, use_cache=False).last_hidden_state
        features = predictor_decoder.pooled(above, mask)
        for row, seq in enumerate(seqs):
            whole = model.model(input_ids=torch.tensor([seq]), use_cache=False).last_hidden_state[0]
            torch.testing.assert_close(model.model.norm(above[row, :len(seq)]), whole, rtol=1e-4, atol=1e-4)
            hidden = model.config.hidden_size
            torch.testing.assert_close(model.model.norm(features[row, :hidden]), whole[-1], rtol=1e-4, atol=1e-4)
    assert len(model.model.layers) == 2 and not isinstance(model.model.norm, torch.nn.Identity)


def test_an_own_copy_of_the_top_layers_trains_without_changing_the_model(tiny_model_path: Path) -> None:
    model = _model(tiny_model_path)
    before = [p.clone() for p in model.model.layers[1].parameters()]
    top = predictor_decoder.layer_slice(model, 1, 2, own_copy=True)
    states = torch.randn(1, 4, model.config.hidden_size)
    top(inputs_embeds=states, attention_mask=torch.ones(1, 4, dtype=torch.long),
        use_cache=False).last_hidden_state.sum().backward()
    with torch.no_grad():
        for p in top.parameters():
            if p.grad is not None:
                p -= p.grad
    assert all(torch.equal(a, b) for a, b in zip(before, model.model.layers[1].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, top.layers[0].parameters()))
