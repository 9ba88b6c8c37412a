"""Initial class maps, presence scores and interactive prompt columns."""

import torch

from engine.method.cross_maps import CrossLevel, class_columns, token_maps
from engine.method.interactive import box_column, point_columns, prompt_mask
from engine.method.presence import presence_scores


def test_token_maps_normalise_upsample_and_weight():
    # One level at 2×2, 2 tokens, latent 2×2 (no resampling): token 0 probs [1,1,1,1]·0.25 →
    # normalised 0.25 each; token 1 probs [0.75,0.75,0.75,0.75]·… → 0.25 each as well.
    probs = torch.tensor([[[0.25, 0.75]] * 4])
    c, raw = token_maps([CrossLevel(probs, (2, 2), 0.7)], (2, 2))
    assert torch.allclose(c, torch.full((1, 4, 2), 0.7 * 0.25))
    assert torch.allclose(raw[0, :, 1], torch.full((4,), 0.7 * 0.75))


def test_each_level_sums_to_its_weight_after_upsampling():
    torch.manual_seed(0)
    coarse = torch.softmax(torch.randn(2, 16, 5), -1)
    mid = torch.softmax(torch.randn(2, 64, 5), -1)
    c, _ = token_maps([CrossLevel(coarse, (4, 4), 0.7), CrossLevel(mid, (8, 8), 0.3)], (16, 16))
    assert c.shape == (2, 256, 5)
    # Bilinear upsampling by an integer factor keeps the mean, so each token sums to (0.7+0.3)·16²/… ≈ 16.
    assert torch.allclose(c.sum(1), torch.full((2, 5), 256 / 16 * 0.7 + 256 / 64 * 0.3), rtol=0.05)


def test_class_columns_average_all_tokens_of_a_class():
    c = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    assert torch.allclose(class_columns(c, [[1], [2, 3]]), torch.tensor([[2.0, 6.0]]))


def test_presence_is_the_peak_attention_share():
    raw = torch.tensor([[0.1, 0.0, 0.2], [0.6, 0.1, 0.3], [0.2, 0.05, 0.05]])
    # class A = token 0 → peak 0.6; class B = tokens 1,2 → per-pixel means [.1, .2, .05] → 0.2.
    assert torch.allclose(presence_scores(raw, [[0], [1, 2]]), torch.tensor([0.6, 0.2]))


def test_point_and_box_columns():
    x0 = point_columns([(0, 0), (99, 49)], (50, 100), (5, 10))
    assert x0.shape == (50, 2)
    assert x0[0, 0] == 1 and x0[49, 1] == 1 and x0.sum() == 2
    box = box_column((0, 0, 50, 25), (50, 100), (5, 10))
    grid = box.reshape(5, 10)
    assert grid[:2, :5].all() and grid.sum() == 10


def test_prompt_mask_is_max_normalised_at_half():
    assert prompt_mask(torch.tensor([[0.2, 0.5], [0.6, 1.0]])).tolist() == [[0, 0], [1, 1]]
