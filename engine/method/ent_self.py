"""Ent-Self (docs/method.md §5): sharpen the self-attention so weak affinities fall to exactly zero."""

from __future__ import annotations

import math

import torch


def entropy_reduced_transition(self_attention: torch.Tensor, ent: float) -> torch.Tensor:
    """Turn self-attention probabilities S [..., N(query), N(key)] into the transition P.

    1. each key column is divided by its max over queries (column max → 1);
    2. one entropy-lowering step where A > 0: A + ent·log10(e·A) (zeros give −inf and
       are clamped back to 0 by step 3, which is the "where A > 0" of the spec);
    3. clamp at 0 and renormalise rows.
    A row that the step empties entirely (only possible for extreme `ent`) falls back to
    its column-normalised row, so P stays row-stochastic instead of turning into NaN.
    """
    column_max = self_attention.float().amax(dim=-2, keepdim=True)
    a = self_attention.float() / torch.where(column_max > 0, column_max, torch.ones_like(column_max))
    if ent == 0:
        sharpened = a.clone()
    else:
        sharpened = a.mul(math.e).log10_().mul_(ent).add_(a).clamp_(min=0)
    row_sum = sharpened.sum(dim=-1, keepdim=True)
    empty = row_sum <= 0
    if bool(empty.any()):
        sharpened = torch.where(empty, a, sharpened)
        row_sum = sharpened.sum(dim=-1, keepdim=True)
    return sharpened.div_(row_sum)
