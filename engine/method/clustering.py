"""Optional KL k-means over the per-pixel token vectors (docs/method.md, step 4; on by default).

Each pixel's 77-dim vector is replaced by its cluster's mean, which evens out the
cross-attention inside a region before refinement.

The distance is computed the way the authors compute it: directly, in float16. Near-ties
between clusters are common (neighbouring pixels have almost equal vectors) and fall the
way that arithmetic makes them fall; float32 or an expanded float64 form assigns other
pixels and changes up to ~10 % of an image's labels. float16 products and differences
are correctly rounded on CPU and GPU alike (both compute in float32, which is wide
enough for one rounding to half to be exact), and sums accumulate in float32 before
their rounding to half on both, so the two devices agree except for a float32
accumulation-order effect that the final rounding almost always absorbs.

All frames of a batch are clustered together and nothing leaves the device inside the
loop: cluster sums are one-hot matrix products (no atomics, so reruns on CUDA agree),
an emptied cluster is masked out of the argmin instead of being dropped, and the
surviving clusters are renumbered in sorted order once at the end, which gives the same
labels as dropping them as they empty.
"""

from __future__ import annotations

import math

import torch

ZERO_FILL = 1e-6
"""Zeros in the pixel vectors are replaced by this before any log."""

KL_EPS = 1e-5
"""Added (in float16) to both distributions inside the symmetric KL, as the authors' distance does."""

DISTANCE_DTYPE = torch.float16
"""The authors' arithmetic for the distance; what decides the near-ties."""

CHUNK_ELEMENTS = 1 << 27
"""Most elements of one [frames, seeds, pixels, tokens] float16 intermediate (256 MB); larger batches go in chunks of frames."""


def seed_indices(latent_hw: tuple[int, int], n_seeds: int) -> torch.Tensor:
    """Flat indices of the seed grid: rows/cols 0, s, 2s, … with s = floor(side / √n_seeds).

    For a 64×64 grid and 32 seeds this is rows/cols 0,11,…,55: 36 seeds.
    """
    height, width = latent_hw
    root = math.sqrt(n_seeds)
    rows = torch.arange(0, height, max(1, math.floor(height / root)))
    cols = torch.arange(0, width, max(1, math.floor(width / root)))
    return (rows[:, None] * width + cols[None, :]).flatten()


def _half_inputs(anchors: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, ...]:
    a = anchors.to(DISTANCE_DTYPE) + KL_EPS
    p = points.to(DISTANCE_DTYPE) + KL_EPS
    return a, p, torch.log(a), torch.log(p)


def symmetric_kl(anchors: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """½KL(a‖p) + ½KL(p‖a) in the authors' float16 direct form: [..., S, T] × [..., N, T] → [..., S, N].

    a, p cast to half, + 1e-5 each; q = log a − log p; distance = ½·Σ a·q − ½·Σ p·q, every
    step rounded to half as the authors' code rounds it. Leading batch dimensions broadcast.
    """
    a, p, log_a, log_p = _half_inputs(anchors, points)
    return _direct(a, p, log_a, log_p)


def _direct(a: torch.Tensor, p: torch.Tensor, log_a: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """The direct form on half inputs, in chunks of frames so no intermediate exceeds CHUNK_ELEMENTS."""
    per_frame = a.shape[-2] * p.shape[-2] * a.shape[-1]
    step = max(1, CHUNK_ELEMENTS // per_frame)
    if a.ndim == 2 or a.shape[0] <= step:
        q = log_a.unsqueeze(-2) - log_p.unsqueeze(-3)
        return (a.unsqueeze(-2) * q).sum(-1) * 0.5 - (p.unsqueeze(-3) * q).sum(-1) * 0.5
    return torch.cat([_direct(a[i:i + step], p[i:i + step], log_a[i:i + step], log_p[i:i + step])
                      for i in range(0, a.shape[0], step)])


def _expanded_with_bound(a: torch.Tensor, p: torch.Tensor, log_a: torch.Tensor,
                         log_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The direct form's exact value on the same half inputs and logs, by float64 matrix products,
    and a bound on how far the half evaluation can round away from it: [B, S, N] each.

    Each half product and difference adds at most u = 2⁻¹¹ relative error per term (or
    2⁻²⁵ absolute where the result is subnormal, below 6.1e-5), the float32 accumulation
    at most 77·2⁻²⁴, the last subtraction u of the result; Σ a·|q| is bounded by ‖a‖·‖q‖
    (Cauchy–Schwarz) so that the bound is itself a matrix product. The bound is doubled
    for safety; tests/test_clustering.py checks it against the half evaluation.
    """
    a, p, log_a, log_p = (t.double() for t in (a, p, log_a, log_p))
    self_a = (a * log_a).sum(-1, keepdim=True)
    self_p = (p * log_p).sum(-1).unsqueeze(-2)
    pos = 0.5 * (self_a - a @ log_p.transpose(-1, -2))
    neg = 0.5 * (log_a @ p.transpose(-1, -2) - self_p)
    distance = pos - neg
    q_sq = (log_a ** 2).sum(-1, keepdim=True) + (log_p ** 2).sum(-1).unsqueeze(-2) - 2 * log_a @ log_p.transpose(-1, -2)
    norms = a.norm(dim=-1, keepdim=True) + p.norm(dim=-1).unsqueeze(-2)
    unit, tokens = 2.0 ** -11, a.shape[-1]
    per_term = 3.1 * unit + tokens * 2.0 ** -24
    subnormal = (tokens + 3) * 2.0 ** -25
    bound = 2 * (0.5 * per_term * norms * q_sq.clamp(min=0).sqrt() * 1.01 + 1.01 * unit * distance.abs() + subnormal)
    return distance, bound


def _assign_filtered(prototypes: torch.Tensor, x: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """The same argmin as over `symmetric_kl`, evaluating the half direct form only where it can matter.

    A pixel whose nearest cluster is nearer than every other by more than the rounding
    bound gets that cluster; the others (the near-ties) are evaluated in half exactly.
    On a CPU, where half arithmetic is slow, this does a few percent of the work.
    """
    a, p, log_a, log_p = _half_inputs(prototypes, x)
    distance, bound = _expanded_with_bound(a, p, log_a, log_p)
    distance = distance.masked_fill(~alive, math.inf)
    labels = distance.argmin(dim=1)
    upper = (distance + bound).amin(dim=1, keepdim=True)
    candidates = ((distance - bound) <= upper) & alive
    frames, pixels = torch.nonzero(candidates.sum(dim=1) > 1, as_tuple=True)
    if len(pixels):
        near = _direct(a[frames], p[frames, pixels].unsqueeze(1), log_a[frames], log_p[frames, pixels].unsqueeze(1))
        near = near.squeeze(-1).masked_fill(~alive[frames, :, 0], math.inf)
        labels[frames, pixels] = near.argmin(dim=1)
    return labels


def _one_hot(labels: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] labels → [B, n, N] membership (row k: the pixels of cluster k)."""
    return (labels.unsqueeze(-2) == torch.arange(n, device=labels.device)[:, None]).to(dtype)


def kl_kmeans(c: torch.Tensor, latent_hw: tuple[int, int], n_seeds: int, iters: int,
              filtered: bool | None = None) -> torch.Tensor:
    """Cluster labels for C [B, N, T] (or one frame [N, T]): per frame 0..n−1, numbering the
    clusters that survive in the order of their seeds.

    filtered: evaluate the half distance only for near-ties (default on CPU, where it is
    ~20× faster; it reads the near-tie count back each iteration, which a GPU should not
    wait for, and there the full evaluation is cheap). Both give the same labels.
    """
    single = c.ndim == 2
    x = c.unsqueeze(0) if single else c
    x = torch.where(x == 0, torch.full_like(x, ZERO_FILL), x).float()
    prototypes = x[:, seed_indices(latent_hw, n_seeds).to(x.device)]
    n = prototypes.shape[1]
    alive = torch.ones(x.shape[0], n, 1, dtype=torch.bool, device=x.device)
    labels = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
    if filtered is None:
        filtered = x.device.type == "cpu"
    for step in range(iters):
        if filtered:
            labels = _assign_filtered(prototypes, x, alive)
        else:
            labels = symmetric_kl(prototypes, x).masked_fill(~alive, math.inf).argmin(dim=1)
        if step == iters - 1:
            break
        members = _one_hot(labels, n, torch.float64)
        counts = members.sum(-1, keepdim=True)
        alive = counts > 0
        prototypes = ((members @ x.double()) / counts.clamp(min=1)).float()
    present = _one_hot(labels, n, torch.long).amax(-1)
    rank = present.cumsum(-1) - 1
    labels = rank.gather(1, labels)
    return labels[0] if single else labels


def cluster_means(c: torch.Tensor, labels: torch.Tensor, n_clusters: int | None = None) -> torch.Tensor:
    """Replace each pixel vector of C [B, N, T] (or [N, T]) by the mean of C over its cluster.

    n_clusters: an upper bound on the labels (the seed count); without it the labels are
    read back from the device once to find it.
    """
    single = c.ndim == 2
    x, lab = (c.unsqueeze(0), labels.unsqueeze(0)) if single else (c, labels)
    n = n_clusters if n_clusters is not None else int(lab.max()) + 1
    members = _one_hot(lab, n, torch.float64)
    means = (members @ x.double()) / members.sum(-1, keepdim=True).clamp(min=1)
    out = means.gather(1, lab.unsqueeze(-1).expand(-1, -1, x.shape[-1])).to(c.dtype)
    return out[0] if single else out
