"""Initial class maps (ISEG_SPEC §3): combine captured cross-attention into per-pixel token vectors."""

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


def _levels_on_latent(levels: list[CrossLevel], latent_hw: tuple[int, int], normalise: bool) -> torch.Tensor:
    total = None
    for level in levels:
        batch, _, tokens = level.probs.shape
        maps = level.probs.float().transpose(1, 2).reshape(batch, tokens, *level.hw)
        if normalise:
            mass = maps.sum(dim=(-2, -1), keepdim=True)
            maps = maps / torch.where(mass > 0, mass, torch.ones_like(mass))
        if tuple(level.hw) != tuple(latent_hw):
            maps = F.interpolate(maps, size=latent_hw, mode="bilinear", align_corners=False)
        weighted = level.weight * maps
        total = weighted if total is None else total + weighted
    assert total is not None, "at least one cross-attention level is required"
    return total.flatten(-2).transpose(1, 2)


def token_maps(levels: list[CrossLevel], latent_hw: tuple[int, int]) -> torch.Tensor:
    """C [B, N, T]: each token map divided by its spatial sum, upsampled to the latent grid, weighted."""
    return _levels_on_latent(levels, latent_hw, normalise=True)


def raw_token_maps(levels: list[CrossLevel], latent_hw: tuple[int, int]) -> torch.Tensor:
    """The same combination without the spatial normalisation: attention shares in [0, 1]."""
    return _levels_on_latent(levels, latent_hw, normalise=False)


def class_columns(c: torch.Tensor, spans: list[list[int]]) -> torch.Tensor:
    """X0 [N, K] from C [N, T]: for class k, the mean of C over its token positions."""
    return torch.stack([c[:, span].mean(dim=1) for span in spans], dim=1)
