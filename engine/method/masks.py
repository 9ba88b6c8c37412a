"""From refined class columns to per-class maps and a label mask (docs/method.md §7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.settings import BackgroundMode


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=(-2, -1), keepdim=True)
    shifted = maps - low
    high = shifted.amax(dim=(-2, -1), keepdim=True)
    return torch.where(high > 0, shifted / torch.where(high > 0, high, torch.ones_like(high)), torch.zeros_like(shifted))


def class_maps(x: torch.Tensor, latent_hw: tuple[int, int], size: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """X [N, K] → [K, H, W]: bilinear to size×size, per-class min–max to [0, 1], bilinear to H×W."""
    grid = x.float().T.reshape(1, x.shape[1], *latent_hw)
    grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    grid = _minmax(grid)
    if tuple(out_hw) != (size, size):
        grid = F.interpolate(grid, size=tuple(out_hw), mode="bilinear", align_corners=False)
    return grid[0]


def label_mask(maps: torch.Tensor, mode: BackgroundMode, threshold: float = 0.45) -> torch.Tensor:
    """uint8 [H, W] labels from maps [K, H, W]: 0 background, k for the k-th class (ties → lowest k).

    Each map is normalised again as (m − min)/(max(m − min) + 1e-6). `threshold` mode
    zeroes maps below the threshold and labels argmax+1 where the max is > 0;
    `power` mode scores background as (1 − max_k map_k)² and takes the argmax.
    """
    flat = maps.float().reshape(maps.shape[0], -1)
    flat = flat - flat.amin(dim=-1, keepdim=True)
    flat = flat / (flat.amax(dim=-1, keepdim=True) + 1e-6)
    if mode == "threshold":
        flat = torch.where(flat < threshold, torch.zeros_like(flat), flat)
        value, index = flat.max(dim=0)
        labels = torch.where(value > 0, index + 1, torch.zeros_like(index))
    elif mode == "power":
        background = (1 - flat.amax(dim=0, keepdim=True)) ** 2
        labels = torch.cat([background, flat], dim=0).argmax(dim=0)
    else:
        raise ValueError(f"background mode {mode!r} is neither 'threshold' nor 'power'")
    return labels.reshape(maps.shape[1:]).to(torch.uint8)
