"""Initial class maps (docs/method.md §3): combine captured cross-attention into per-pixel token vectors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CrossLevel:
    """Head-mean cross-attention probabilities of one resolution level.

    probs: [B, h·w, T] (queries row-major), the mean over every head of every read layer
    at that level; weight: its share in the combination (0.7 at 1/4, 0.3 at 1/2 latent).
    """

    probs: torch.Tensor
    hw: tuple[int, int]
    weight: float


def token_maps(levels: list[CrossLevel], latent_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, raw), both [B, N, T] on the latent grid, from one upsampling per level.

    C: each token map divided by its spatial sum at its own resolution, upsampled, weighted
    (docs/method.md §3). raw: the same without the division, i.e. attention shares in [0, 1]
    (the presence score reads it). Bilinear upsampling is linear, so dividing after it by
    the pre-upsampling sum is the spec's order of operations.
    """
    c_total, raw_total = None, None
    for level in levels:
        batch, _, tokens = level.probs.shape
        maps = level.probs.float().transpose(1, 2).reshape(batch, tokens, *level.hw)
        mass = maps.sum(dim=(-2, -1), keepdim=True)
        if tuple(level.hw) != tuple(latent_hw):
            maps = F.interpolate(maps, size=latent_hw, mode="bilinear", align_corners=False)
        raw = level.weight * maps
        c = raw / torch.where(mass > 0, mass, torch.ones_like(mass))
        c_total = c if c_total is None else c_total + c
        raw_total = raw if raw_total is None else raw_total + raw
    assert c_total is not None and raw_total is not None, "at least one cross-attention level is required"
    return c_total.flatten(-2).transpose(1, 2), raw_total.flatten(-2).transpose(1, 2)


def class_columns(c: torch.Tensor, spans: list[list[int]]) -> torch.Tensor:
    """X0 [N, K] from C [N, T]: for class k, the mean of C over its token positions."""
    return torch.stack([c[:, span].mean(dim=1) for span in spans], dim=1)
