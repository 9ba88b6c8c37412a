"""Optional KL k-means over the per-pixel token vectors (ISEG_SPEC §3, the official default).

Each pixel's 77-dim vector is replaced by its cluster's mean, which evens out the
cross-attention inside a region before refinement.
"""

from __future__ import annotations

import math

import torch

ZERO_FILL = 1e-6
"""Zeros in the pixel vectors are replaced by this before any log (ISEG_SPEC §3)."""

KL_EPS = 1e-5
"""Added to both distributions inside the symmetric KL, as the authors' distance does."""


def seed_indices(latent_hw: tuple[int, int], n_seeds: int) -> torch.Tensor:
    """Flat indices of the seed grid: rows/cols 0, s, 2s, … with s = floor(side / √n_seeds).

    For a 64×64 grid and 32 seeds this is rows/cols 0,11,…,55: 36 seeds.
    """
    height, width = latent_hw
    root = math.sqrt(n_seeds)
    rows = torch.arange(0, height, max(1, math.floor(height / root)))
    cols = torch.arange(0, width, max(1, math.floor(width / root)))
    return (rows[:, None] * width + cols[None, :]).flatten()


def symmetric_kl(anchors: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """½KL(a‖p) + ½KL(p‖a) for every anchor/point pair: [S, T] × [N, T] → [S, N].

    Expanded into matrix products, which cancel terms of similar size; float64 keeps
    that cancellation below float32 rounding of the direct sum, so near-ties fall the
    way a direct evaluation would.
    """
    a = anchors.double() + KL_EPS
    p = points.double() + KL_EPS
    log_a, log_p = torch.log(a), torch.log(p)
    self_a = (a * log_a).sum(dim=-1)
    self_p = (p * log_p).sum(dim=-1)
    return 0.5 * (self_a[:, None] + self_p[None, :] - a @ log_p.T - log_a @ p.T)


def kl_kmeans(c: torch.Tensor, latent_hw: tuple[int, int], n_seeds: int, iters: int) -> torch.Tensor:
    """Cluster labels [N] (0..n-1 in sorted order of surviving clusters) for C [N, T]."""
    x = torch.where(c == 0, torch.full_like(c, ZERO_FILL), c).float()
    prototypes = x[seed_indices(latent_hw, n_seeds).to(c.device)]
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=c.device)
    for _ in range(iters):
        labels = symmetric_kl(prototypes, x).argmin(dim=0)
        present, labels = torch.unique(labels, sorted=True, return_inverse=True)
        sums = torch.zeros(len(present), x.shape[1], device=x.device).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=len(present)).clamp(min=1)
        prototypes = sums / counts[:, None]
    return labels


def cluster_means(c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Replace each pixel vector of C [N, T] by the mean of C over its cluster."""
    n_clusters = int(labels.max()) + 1
    sums = torch.zeros(n_clusters, c.shape[1], dtype=c.dtype, device=c.device).index_add_(0, labels, c)
    counts = torch.bincount(labels, minlength=n_clusters).to(c.dtype)
    return (sums / counts[:, None])[labels]
