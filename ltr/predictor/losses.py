"""ListMLE (Xia et al., 2008) for ranking prompts by the length of their answers.

Convention used everywhere in `ltr`: a higher score means a *longer* predicted output. ListMLE maximises
the Plackett-Luce likelihood of the true order "longest first", so the loss of one list is

    sum_i [ log sum_{j >= i} exp(s_{pi_j}) - s_{pi_i} ]

with pi sorting the list by descending output length. Equal lengths are ordered at random on every call
(a fixed tie order would teach the model an arbitrary preference), and the suffix log-sum-exp is computed
with `torch.logcumsumexp`, which stays finite for large scores.

Served traffic adds answers cut at max_tokens, whose length is only a lower bound. Their place in the
longest-first order is unknown, so `risk_set_loss` ranks the other way, as survival analysis does (Cox's
partial likelihood, Breslow ties): each answer that ended is chosen, as the shortest, from the answers still
running at its length, censored ones included, with weights exp(-score). `known_pairs_loss` is the pairwise
counterpart (RankNet's logistic loss over the pairs of known order, Harrell's rule): the surrogate of the
censor-aware Kendall tau that live ranking quality and the served-loop benchmark report.
"""

from __future__ import annotations

import torch
from torch import Tensor


def listmle_loss(scores: Tensor, lengths: Tensor, generator: torch.Generator | None = None,
                 reduction: str = "mean") -> Tensor:
    """Negative Plackett-Luce log-likelihood of the descending-length order of each list.

    scores, lengths: [B, L] (one row per list). generator: randomness for tie-breaking.
    reduction: "mean" over lists (default), "sum", or "none" ([B] per-list losses).
    """
    if scores.dim() != 2 or scores.shape != lengths.shape:
        raise ValueError(f"scores and lengths must both be [B, L]; got {tuple(scores.shape)} and "
                         f"{tuple(lengths.shape)}")
    if scores.shape[1] == 0:
        raise ValueError("lists must hold at least one item")
    _check_reduction(reduction)
    # Random tie-breaking: shuffle each row, then a *stable* sort keeps the shuffled order among equals.
    noise = torch.rand(scores.shape, generator=generator, device=generator.device if generator else None)
    shuffle = noise.to(scores.device).argsort(dim=1)
    lengths_shuffled = lengths.gather(1, shuffle)
    order = lengths_shuffled.argsort(dim=1, descending=True, stable=True)
    ranked = scores.gather(1, shuffle.gather(1, order))  # scores, longest answer first
    # log sum_{j >= i} exp(s_j): logcumsumexp over the reversed list, reversed back.
    suffix_lse = ranked.flip(1).logcumsumexp(dim=1).flip(1)
    per_list = (suffix_lse - ranked).sum(dim=1)
    return _reduce(per_list, reduction)


def risk_set_loss(scores: Tensor, lengths: Tensor, censored: Tensor, reduction: str = "mean") -> Tensor:
    """Negative partial log-likelihood of right-censored lengths: for every answer i that ended,

        log sum_{j : length_j >= length_i} exp(-s_j) + s_i

    summed over the list. An answer cut at c (`censored`) only sits in the risk sets of answers that ended
    at or below c, so what it teaches is exactly what is known: it ran longer than those. Without censoring
    and ties this is ListMLE read shortest first.

    scores, lengths, censored: [B, L]. reduction: "mean" over lists (default), "sum", or "none".
    """
    _check_censored_lists(scores, lengths, censored, reduction)
    at_risk = lengths.unsqueeze(1) >= lengths.unsqueeze(2)   # [B, i, j]: j still running when i ended
    hazards = (-scores).unsqueeze(1).expand_as(at_risk).masked_fill(~at_risk, float("-inf"))
    per_item = hazards.logsumexp(dim=2) + scores
    per_list = per_item.masked_fill(censored.bool(), 0.0).sum(dim=1)
    return _reduce(per_list, reduction)


def known_pairs_loss(scores: Tensor, lengths: Tensor, censored: Tensor, reduction: str = "mean") -> Tensor:
    """Mean logistic loss log(1 + exp(s_short - s_long)) over the pairs of each list whose order is known:
    the shorter answer ended (`censored` False) and the other one is longer, ended or cut. Two cut answers,
    or an answer cut at or below one that ended, are never compared (Harrell's rule, as in
    `ltr.predictor.live_quality`); equal lengths are no pair. A list without a known pair adds 0.

    scores, lengths, censored: [B, L]. reduction: "mean" over lists (default), "sum", or "none".
    """
    _check_censored_lists(scores, lengths, censored, reduction)
    known = (lengths.unsqueeze(2) < lengths.unsqueeze(1)) & ~censored.bool().unsqueeze(2)  # [B, i, j]: i shorter
    margins = scores.unsqueeze(2) - scores.unsqueeze(1)                                    # s_i - s_j
    pair_losses = torch.nn.functional.softplus(margins).masked_fill(~known, 0.0)
    per_list = pair_losses.sum(dim=(1, 2)) / known.sum(dim=(1, 2)).clamp(min=1)
    return _reduce(per_list, reduction)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


def _check_censored_lists(scores: Tensor, lengths: Tensor, censored: Tensor, reduction: str) -> None:
    if scores.dim() != 2 or scores.shape != lengths.shape or scores.shape != censored.shape:
        raise ValueError(f"scores, lengths and censored must all be [B, L]; got {tuple(scores.shape)}, "
                         f"{tuple(lengths.shape)} and {tuple(censored.shape)}")
    _check_reduction(reduction)


def _reduce(per_list: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_list
    return per_list.sum() if reduction == "sum" else per_list.mean()
