"""KL k-means over pixel token vectors."""

import torch

from engine.method.clustering import cluster_means, kl_kmeans, seed_indices, symmetric_kl


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
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.9, 0.1]])
    assert abs(float(symmetric_kl(p, q)) - 0.439445) < 1e-4
    assert torch.allclose(symmetric_kl(p, q), symmetric_kl(q, p).T)
    assert float(symmetric_kl(p, p)) < 1e-6


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
