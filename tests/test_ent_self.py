"""Ent-Self on hand-made matrices (values worked out by hand in the comments)."""

import torch

from engine.method.ent_self import entropy_reduced_transition


def test_two_by_two_by_hand():
    # S rows sum to 1. Column maxima: 0.5 and 0.9 → A = [[1, 5/9], [0.2, 1]].
    # A + 0.1·log10(e·A): 1 → 1.043429; 5/9 → 0.573458; 0.2 → 0.173532.
    # Rows renormalised: [1.043429, 0.573458]/1.616887 and [0.173532, 1.043429]/1.216961.
    s = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    p = entropy_reduced_transition(s, 0.1)
    expected = torch.tensor([[0.645332, 0.354668], [0.142594, 0.857406]])
    assert torch.allclose(p, expected, atol=1e-5)


def test_weak_affinities_become_exactly_zero():
    # A = [[1, 0.0204], [0.0204, 1]]; 0.0204 + 0.1·log10(e·0.0204) = 0.0204 − 0.1256 < 0 → 0.
    s = torch.tensor([[0.98, 0.02], [0.02, 0.98]])
    p = entropy_reduced_transition(s, 0.1)
    assert torch.equal(p, torch.eye(2))


def test_exact_zeros_stay_zero_and_rows_are_stochastic():
    torch.manual_seed(0)
    s = torch.rand(6, 32, 32) ** 4
    s[:, :, :3] = 0.0
    s = s / s.sum(-1, keepdim=True)
    p = entropy_reduced_transition(s, 0.1)
    assert torch.all(p[:, :, :3] == 0)
    assert torch.allclose(p.sum(-1), torch.ones(6, 32), atol=1e-6)
    assert torch.all(p >= 0)
    assert bool(torch.isfinite(p).all())


def test_ent_zero_is_column_then_row_normalisation():
    s = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    a = s / s.amax(0, keepdim=True)
    assert torch.allclose(entropy_reduced_transition(s, 0.0), a / a.sum(1, keepdim=True))


def test_entropy_goes_down():
    torch.manual_seed(1)
    s = torch.softmax(torch.randn(64, 64) * 2, dim=-1)
    p = entropy_reduced_transition(s, 0.1)
    q = s / s.amax(0, keepdim=True)
    q = q / q.sum(-1, keepdim=True)

    def entropy(m):
        return float(-(m * torch.log(m.clamp_min(1e-30))).sum(-1).mean())

    assert entropy(p) < entropy(q)


def test_emptied_row_falls_back_instead_of_nan():
    # Rows 0-2 each hold a column max. Row 3 has A ≈ [0.347, 0.337, 0.337] < 1/e, so with
    # ent = 50 every entry goes negative (0.347 + 50·log10(0.943) ≈ −0.93) and the row empties:
    # it falls back to its column-normalised row instead of dividing by zero.
    s = torch.tensor([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.01, 0.98], [0.34, 0.33, 0.33]])
    p = entropy_reduced_transition(s, 50.0)
    assert bool(torch.isfinite(p).all())
    assert torch.allclose(p.sum(-1), torch.ones(4))
    a = s[3] / 0.98
    assert torch.allclose(p[3], a / a.sum())
    assert torch.allclose(p[0], torch.tensor([1.0, 0.0, 0.0]))
