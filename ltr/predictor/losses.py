"""ListMLE (Xia et al., 2008) for ranking prompts by the length of their answers.

Convention used everywhere in `ltr`: a higher score means a *longer* predicted output. ListMLE maximises
the Plackett-Luce likelihood of the true order "longest first", so the loss of one list is

    sum_i [ log sum_{j >= i} exp(s_{pi_j}) - s_{pi_i} ]

with pi sorting the list by descending output length. Equal lengths are ordered at random on every call
(a fixed tie order would teach the model an arbitrary preference), and the suffix log-sum-exp is computed
with `torch.logcumsumexp`, which stays finite for large scores.
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
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    # Random tie-breaking: shuffle each row, then a *stable* sort keeps the shuffled order among equals.
    noise = torch.rand(scores.shape, generator=generator, device=generator.device if generator else None)
    shuffle = noise.to(scores.device).argsort(dim=1)
    lengths_shuffled = lengths.gather(1, shuffle)
    order = lengths_shuffled.argsort(dim=1, descending=True, stable=True)
    ranked = scores.gather(1, shuffle.gather(1, order))  # scores, longest answer first
    # log sum_{j >= i} exp(s_j): logcumsumexp over the reversed list, reversed back.
    suffix_lse = ranked.flip(1).logcumsumexp(dim=1).flip(1)
    per_list = (suffix_lse - ranked).sum(dim=1)
    if reduction == "none":
        return per_list
    return per_list.sum() if reduction == "sum" else per_list.mean()
