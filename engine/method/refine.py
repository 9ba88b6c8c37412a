"""Iterative refinement (docs/method.md §6): propagate class maps through the Ent-Self transition."""

from __future__ import annotations

import torch


def normalise_columns(x: torch.Tensor) -> torch.Tensor:
    """Per class column over pixels: subtract the min, divide by the sum.

    A constant column (sum 0 after the shift) becomes uniform rather than NaN.
    """
    shifted = x - x.amin(dim=-2, keepdim=True)
    total = shifted.sum(dim=-2, keepdim=True)
    uniform = torch.full_like(shifted, 1.0 / shifted.shape[-2])
    return torch.where(total > 0, shifted / torch.where(total > 0, total, torch.ones_like(total)), uniform)


def refine(transition: torch.Tensor, x0: torch.Tensor, iters: int) -> torch.Tensor:
    """X = norm(X0); `iters` times X = norm(P @ X). P [..., N, N], X0 [..., N, K]."""
    x = normalise_columns(x0.float())
    p = transition.float()
    for _ in range(iters):
        x = normalise_columns(torch.matmul(p, x))
    return x
