"""KL k-means over pixel token vectors, in the authors' float16 arithmetic."""

import pytest
import torch
import torch.nn.functional as F

from engine.method.clustering import (_expanded_with_bound, _half_inputs, cluster_means, kl_kmeans, seed_indices,
                                      symmetric_kl)


def authors_kmeans(x: torch.Tensor, side: int) -> torch.Tensor:
    """The official k-means restated literally: half-precision direct distance, clusters dropped
    as they empty (Python loop over the survivors), relabelled in sorted order at the end."""
    x = torch.where(x == 0, 1e-6, x)
    step = side // 32 ** 0.5
    grid = torch.arange(0, side, step)[None].long()
    grid = grid.T * side + grid
    prototype, cluster = x[grid.flatten()], None
    for _ in range(20):
        a, b = prototype.unsqueeze(-2).half() + 1e-5, x.unsqueeze(-3).half() + 1e-5
        quotient = torch.log(a) - torch.log(b)
        dis = (a * quotient).sum(-1) * 0.5 - (b * quotient).sum(-1) * 0.5
        _, cluster = torch.min(dis, dim=0)
        idx = cluster.unique()
        prototype = torch.stack([x[cluster == v].mean(0) for v in idx], dim=0)
    idx = cluster.unique()
    for v in idx:
        cluster[cluster == v] = torch.nonzero(idx == v).squeeze()
    return cluster


def float64_expansion_kmeans(x: torch.Tensor, side: int) -> torch.Tensor:
    """What the engine did before: the same k-means with the distance expanded into float64 matrix products."""
    x = torch.where(x == 0, 1e-6, x).float()
    prototypes = x[seed_indices((side, side), 32)]
    for _ in range(20):
        a, p = prototypes.double() + 1e-5, x.double() + 1e-5
        log_a, log_p = a.log(), p.log()
        distance = 0.5 * ((a * log_a).sum(-1)[:, None] + (p * log_p).sum(-1)[None] - a @ log_p.T - log_a @ p.T)
        present, labels = torch.unique(distance.argmin(0), sorted=True, return_inverse=True)
        prototypes = torch.stack([x[labels == v].mean(0) for v in range(len(present))])
    return labels


def attention_like(seed: int, side: int = 64, low: int = 8) -> torch.Tensor:
    """[side², 77] token vectors like C: smooth low-resolution maps upsampled, each divided by
    its spatial sum (values ~1/side², many near-ties between neighbouring pixels)."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(1, 77, low, low, generator=generator) ** 4
    maps = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)
    maps = maps / maps.sum((-2, -1), keepdim=True)
    return maps.flatten(-2)[0].T.contiguous()


def test_seed_grid_of_the_official_setting():
    seeds = seed_indices((64, 64), 32)
    rows, cols = seeds // 64, seeds % 64
    assert len(seeds) == 36
    assert sorted(set(rows.tolist())) == [0, 11, 22, 33, 44, 55]
    assert sorted(set(cols.tolist())) == [0, 11, 22, 33, 44, 55]


def test_seed_grid_follows_the_latent_size():
    seeds = seed_indices((32, 32), 32)
    assert sorted(set((seeds % 32).tolist())) == [0, 5, 10, 15, 20, 25, 30]


def test_symmetric_kl_by_hand():
    # p = [0.5, 0.5], q = [0.9, 0.1]: ½Σ(p−q)(log p − log q) = ½[(−0.4)(log 0.5/0.9) + 0.4 (log 0.5/0.1)]
    # = ½[0.4·0.587787 + 0.4·1.609438] = 0.439445 (ε = 1e-5 shifts the 4th decimal at most).
    # In float16 (as the authors compute it) the value is good to about 1e-3.
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.9, 0.1]])
    assert symmetric_kl(p, q).dtype == torch.float16
    assert abs(float(symmetric_kl(p, q)) - 0.439445) < 1e-3
    assert torch.allclose(symmetric_kl(p, q), symmetric_kl(q, p).T)
    assert float(symmetric_kl(p, p)) == 0.0


def test_kmeans_labels_are_the_authors_float16_labels():
    # The fidelity test of the clustering: identical labels to the literal official k-means.
    # The float64 expansion the engine used before fails it (near-ties fall the other way).
    c = attention_like(0)
    official = authors_kmeans(c, 64)
    assert torch.equal(kl_kmeans(c, (64, 64), 32, 20), official)
    assert torch.equal(kl_kmeans(c, (64, 64), 32, 20, filtered=False), official)
    assert (float64_expansion_kmeans(c, 64) != official).float().mean() > 0.01


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rounding_bound_holds_and_the_filter_keeps_the_argmin(seed):
    # The CPU path evaluates float16 only where the float64 value ± bound leaves a near-tie;
    # it is exact only if the bound really bounds the float16 rounding (here with subnormal
    # halves too: tiny values, and a frame of exact zeros).
    c = attention_like(seed, side=32, low=4)
    c[:, :5] = c[:, :5] * 1e-3
    c[:64] = 0
    x = torch.where(c == 0, 1e-6, c)[None]
    prototypes = x[:, seed_indices((32, 32), 32)]
    half = symmetric_kl(prototypes, x).double()
    value, bound = _expanded_with_bound(*_half_inputs(prototypes, x))
    assert bool(((half - value).abs() <= bound).all())
    assert torch.equal(kl_kmeans(c, (32, 32), 32, 20), kl_kmeans(c, (32, 32), 32, 20, filtered=False))
    assert torch.equal(kl_kmeans(c, (32, 32), 32, 20), authors_kmeans(c, 32))


def test_a_batch_clusters_each_frame_as_alone():
    frames = torch.stack([attention_like(seed, side=32, low=4) for seed in (4, 5, 6)])
    together = kl_kmeans(frames, (32, 32), 32, 20)
    for index in range(3):
        assert torch.equal(together[index], kl_kmeans(frames[index], (32, 32), 32, 20))
    means = cluster_means(frames, together, len(seed_indices((32, 32), 32)))
    for index in range(3):
        assert torch.allclose(means[index], cluster_means(frames[index], together[index]))


def test_emptied_clusters_are_dropped_and_the_rest_renumbered_in_order():
    # Two flat regions and 36 seeds: all but two clusters empty after the first assignment;
    # the survivors are numbered 0, 1 in seed order, as the authors' drop-and-relabel does.
    side = 32
    region = torch.zeros(side, side, dtype=torch.long)
    region[:, 20:] = 1
    centres = torch.softmax(torch.randn(2, 77, generator=torch.Generator().manual_seed(0)) * 3, -1)
    c = centres[region.flatten()]
    labels = kl_kmeans(c, (side, side), 32, 20)
    assert torch.equal(labels, region.flatten())
    assert torch.equal(labels, authors_kmeans(c, side))


def test_kmeans_recovers_piecewise_constant_regions():
    torch.manual_seed(0)
    h = w = 32
    region = torch.zeros(h, w, dtype=torch.long)
    region[8:20, 6:26] = 1
    region[22:, :10] = 2
    centres = torch.softmax(torch.randn(3, 10) * 3, -1)
    c = centres[region.flatten()] * (1 + 0.01 * torch.rand(h * w, 10))
    labels = kl_kmeans(c, (h, w), 32, 20)
    # Several seeds fall in each region, so a region may hold several clusters, but no
    # cluster straddles two regions, and labels are 0..n-1 with none empty.
    for label in torch.unique(labels):
        assert len(torch.unique(region.flatten()[labels == label])) == 1
    assert torch.equal(torch.unique(labels), torch.arange(int(labels.max()) + 1))
    smoothed = cluster_means(c, labels)
    for r in range(3):
        inside = smoothed[region.flatten() == r]
        assert torch.allclose(inside, centres[r].expand_as(inside), rtol=0.02)


def test_cluster_means_by_hand():
    c = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1])
    assert torch.allclose(cluster_means(c, labels), torch.tensor([[2.0, 1.0], [2.0, 1.0], [5.0, 5.0]]))
