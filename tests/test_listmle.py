"""ListMLE: ordering, stability, the exact Plackett-Luce likelihood, and random tie-breaking; its censored
variant, the risk-set loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ltr.predictor.losses import known_pairs_loss, listmle_loss, risk_set_loss


def _pl_log_prob(scores: list[float], order: list[int]) -> float:
    """log P(order) under Plackett-Luce, written out term by term."""
    total, remaining = 0.0, list(order)
    for item in order:
        total += scores[item] - math.log(sum(math.exp(scores[j]) for j in remaining))
        remaining.remove(item)
    return total


def test_perfect_order_beats_reversed() -> None:
    lengths = torch.tensor([[10.0, 50.0, 200.0, 400.0, 900.0]])
    aligned = torch.log(lengths)          # higher score = longer output
    assert listmle_loss(aligned, lengths) < listmle_loss(-aligned, lengths)


def test_gradient_finite_for_extreme_scores() -> None:
    scores = torch.tensor([[1e4, -1e4, 3e3, 0.0, 5e3, -7e3]], requires_grad=True)
    lengths = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    loss = listmle_loss(scores, lengths)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(scores.grad).all()
    assert scores.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_plackett_luce(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, 4, generator=g, dtype=torch.float64) * 2
    total_prob = 0.0
    for perm in itertools.permutations(range(4)):
        # Lengths that make `perm` the longest-first order.
        lengths = torch.zeros(1, 4, dtype=torch.float64)
        for rank, item in enumerate(perm):
            lengths[0, item] = 100.0 - rank
        loss = listmle_loss(scores, lengths).item()
        assert loss == pytest.approx(-_pl_log_prob(scores[0].tolist(), list(perm)), rel=1e-9, abs=1e-9)
        total_prob += math.exp(-loss)
    assert total_prob == pytest.approx(1.0, abs=1e-9)   # a proper distribution over all 4! orders


def test_batch_reductions_agree() -> None:
    g = torch.Generator().manual_seed(3)
    scores, lengths = torch.randn(5, 8, generator=g), torch.rand(5, 8, generator=g) * 500
    per_list = listmle_loss(scores, lengths, reduction="none")
    assert per_list.shape == (5,)
    assert listmle_loss(scores, lengths) == pytest.approx(per_list.mean().item())
    assert listmle_loss(scores, lengths, reduction="sum") == pytest.approx(per_list.sum().item(), rel=1e-6)


def test_ties_are_broken_at_random() -> None:
    scores = torch.tensor([[0.3, -1.2, 2.0, 0.7, -0.1, 1.1]])
    tied = torch.full((1, 6), 42.0)
    draws = {round(listmle_loss(scores, tied, generator=torch.Generator().manual_seed(s)).item(), 6)
             for s in range(20)}
    assert len(draws) > 5                     # different tie orders, not one fixed order
    same = [listmle_loss(scores, tied, generator=torch.Generator().manual_seed(7)).item() for _ in range(2)]
    assert same[0] == same[1]                 # reproducible with a seeded generator
    # Without ties the generator must not matter.
    distinct = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    values = {listmle_loss(scores, distinct, generator=torch.Generator().manual_seed(s)).item() for s in range(5)}
    assert len(values) == 1


def test_partial_ties_average_over_tie_orders() -> None:
    """With two tied items the loss is one of the two orderings' losses, each drawn about half the time."""
    scores = torch.tensor([[1.5, -0.5, 0.2]], dtype=torch.float64)
    lengths = torch.tensor([[10.0, 10.0, 1.0]], dtype=torch.float64)
    a = -_pl_log_prob(scores[0].tolist(), [0, 1, 2])
    b = -_pl_log_prob(scores[0].tolist(), [1, 0, 2])
    seen = [listmle_loss(scores, lengths, generator=torch.Generator().manual_seed(s)).item() for s in range(200)]
    assert all(min(abs(v - a), abs(v - b)) < 1e-9 for v in seen)
    share_a = sum(abs(v - a) < 1e-9 for v in seen) / len(seen)
    assert 0.3 < share_a < 0.7


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="must both be"):
        listmle_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="must both be"):
        listmle_loss(torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("seed", [0, 1])
def test_risk_set_loss_without_censoring_is_plackett_luce_shortest_first(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, 4, generator=g, dtype=torch.float64) * 2
    for perm in itertools.permutations(range(4)):
        lengths = torch.zeros(1, 4, dtype=torch.float64)
        for rank, item in enumerate(perm):   # `perm` is the shortest-first order
            lengths[0, item] = 10.0 + rank
        loss = risk_set_loss(scores, lengths, torch.zeros(1, 4, dtype=torch.bool)).item()
        assert loss == pytest.approx(-_pl_log_prob((-scores[0]).tolist(), list(perm)), rel=1e-9, abs=1e-9)


def test_risk_set_loss_by_hand_with_cut_answers() -> None:
    # a ended at 10, b ended at 30, c was cut at 20, d was cut at 5.
    # a ended with a, b, c still running (d: unknown past 5); b ended alone (c: unknown past 20).
    sa, sb, sc, sd = 0.4, -1.0, 2.0, 0.3
    scores = torch.tensor([[sa, sb, sc, sd]], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([[10.0, 30.0, 20.0, 5.0]], dtype=torch.float64)
    censored = torch.tensor([[False, False, True, True]])
    expected = math.log(math.exp(-sa) + math.exp(-sb) + math.exp(-sc)) + sa + (math.log(math.exp(-sb)) + sb)
    loss = risk_set_loss(scores, lengths, censored)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    grad = scores.grad[0].tolist()
    assert grad[3] == 0.0          # cut before any answer ended: it teaches nothing
    assert grad[2] < 0.0           # cut after a ended: gradient descent raises its score (longer)
    assert grad[0] > 0.0           # the shortest answer that ended: its score goes down


def test_risk_set_loss_reductions_and_shapes() -> None:
    g = torch.Generator().manual_seed(4)
    scores, lengths = torch.randn(5, 8, generator=g), torch.randint(1, 50, (5, 8), generator=g).float()
    censored = torch.rand(5, 8, generator=g) < 0.5
    per_list = risk_set_loss(scores, lengths, censored, reduction="none")
    assert per_list.shape == (5,) and torch.isfinite(per_list).all()
    assert risk_set_loss(scores, lengths, censored) == pytest.approx(per_list.mean().item())
    all_cut = risk_set_loss(scores, lengths, torch.ones(5, 8, dtype=torch.bool), reduction="none")
    assert torch.equal(all_cut, torch.zeros(5))   # nothing ended: nothing is known
    with pytest.raises(ValueError, match="must all be"):
        risk_set_loss(scores, lengths, censored[:, :4])


def test_known_pairs_loss_by_hand_with_cut_answers() -> None:
    # a ended at 10, b ended at 30, c was cut at 20, d was cut at 5, e ended at 10 (a tie with a).
    # Known pairs (shorter, longer): (a, b), (a, c), (e, b), (e, c); d: cut below every answer that ended;
    # b vs c: b ended past c's cut; a vs e: equal lengths.
    s = {"a": 0.4, "b": -1.0, "c": 2.0, "d": 0.3, "e": -0.2}
    scores = torch.tensor([list(s.values())], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([[10.0, 30.0, 20.0, 5.0, 10.0]], dtype=torch.float64)
    censored = torch.tensor([[False, False, True, True, False]])
    pairs = [("a", "b"), ("a", "c"), ("e", "b"), ("e", "c")]
    expected = sum(math.log1p(math.exp(s[short] - s[long])) for short, long in pairs) / len(pairs)
    loss = known_pairs_loss(scores, lengths, censored)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    grad = dict(zip(s, scores.grad[0].tolist()))
    assert grad["d"] == 0.0                      # in no known pair: it teaches nothing
    assert grad["b"] < 0.0 and grad["c"] < 0.0   # the longer ones: gradient descent raises their scores
    assert grad["a"] > 0.0 and grad["e"] > 0.0


def test_known_pairs_loss_reductions_and_shapes() -> None:
    g = torch.Generator().manual_seed(4)
    scores, lengths = torch.randn(5, 8, generator=g), torch.randint(1, 50, (5, 8), generator=g).float()
    censored = torch.rand(5, 8, generator=g) < 0.5
    per_list = known_pairs_loss(scores, lengths, censored, reduction="none")
    assert per_list.shape == (5,) and torch.isfinite(per_list).all() and (per_list > 0).all()
    assert known_pairs_loss(scores, lengths, censored) == pytest.approx(per_list.mean().item())
    assert known_pairs_loss(scores, lengths, censored, reduction="sum") == pytest.approx(per_list.sum().item())
    all_cut = known_pairs_loss(scores, lengths, torch.ones(5, 8, dtype=torch.bool), reduction="none")
    assert torch.equal(all_cut, torch.zeros(5))   # nothing ended: nothing is known
    with pytest.raises(ValueError, match="must all be"):
        known_pairs_loss(scores, lengths, censored[:, :4])
    with pytest.raises(ValueError, match="reduction must be"):
        known_pairs_loss(scores, lengths, censored, reduction="max")
