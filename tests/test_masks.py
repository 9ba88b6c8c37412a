"""Maps to labels in threshold and power modes (docs/method.md §7)."""

import torch

from engine.method.masks import class_maps, label_mask


def test_threshold_mode_by_hand():
    # Two classes on 4 pixels; after per-map (m−min)/(max+1e-6) map0 = [0,.2,.6,1], map1 = [1,.5,.0,.1]·(1/1).
    maps = torch.tensor([[[0.0, 0.2], [0.6, 1.0]], [[1.0, 0.5], [0.0, 0.1]]])
    labels = label_mask(maps, "threshold", 0.45)
    # pixel0: map1 wins (1.0); pixel1: map0 0.2<.45 → 0, map1 .5 → class 2; pixel2: class 1; pixel3: class 1.
    assert labels.tolist() == [[2, 2], [1, 1]]
    assert labels.dtype == torch.uint8


def test_threshold_mode_background_when_all_below():
    maps = torch.tensor([[[0.0, 0.4], [0.3, 1.0]]])
    assert label_mask(maps, "threshold", 0.45).tolist() == [[0, 0], [0, 1]]


def test_ties_go_to_the_lowest_class():
    maps = torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]])
    assert label_mask(maps, "threshold", 0.45).tolist() == [[0, 1]]
    assert label_mask(maps, "power", 0.0).tolist() == [[0, 1]]


def test_power_mode_by_hand():
    # map0 = [0, .3, 1], map1 = [0, .8, .2]/0.8 → [0, 1, .25]; bg = (1 − max)² = [1, 0, 0].
    maps = torch.tensor([[[0.0, 0.3, 1.0]], [[0.0, 0.8, 0.2]]])
    assert label_mask(maps, "power").tolist() == [[0, 2, 1]]


def test_class_maps_shape_and_range():
    torch.manual_seed(0)
    x = torch.rand(64, 2)
    maps = class_maps(x, (8, 8), 64, (30, 50))
    assert maps.shape == (2, 30, 50)
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    full = class_maps(x, (8, 8), 64, (64, 64))
    assert torch.allclose(full.amax(dim=(1, 2)), torch.ones(2))
    assert torch.allclose(full.amin(dim=(1, 2)), torch.zeros(2))


def test_constant_map_is_zero_not_nan():
    maps = class_maps(torch.ones(16, 1), (4, 4), 64, (10, 10))
    assert torch.equal(maps, torch.zeros(1, 10, 10))
