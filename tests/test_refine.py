"""Iterative refinement on hand-made matrices, and its invariants."""

import torch

from engine.method.refine import normalise_columns, refine


def test_normalise_columns_by_hand():
    # column [3, 1, 0]: min 0, sum 4 → [0.75, 0.25, 0]; column [2, 2, 4]: −2 → [0, 0, 2]/2.
    x = torch.tensor([[3.0, 2.0], [1.0, 2.0], [0.0, 4.0]])
    assert torch.allclose(normalise_columns(x), torch.tensor([[0.75, 0.0], [0.25, 0.0], [0.0, 1.0]]))


def test_one_step_by_hand():
    # P averages pixels 0 and 1 and keeps 2: P@[0.75, 0.25, 0] = [0.5, 0.5, 0], already normalised.
    p = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    x0 = torch.tensor([[3.0], [1.0], [0.0]])
    assert torch.allclose(refine(p, x0, 1), torch.tensor([[0.5], [0.5], [0.0]]))
    assert torch.allclose(refine(p, x0, 0), torch.tensor([[0.75], [0.25], [0.0]]))


def test_second_step_subtracts_the_min():
    # P mixes everything a little: P@[0.75,0.25,0] = [0.5, 0.4, 0.2] → −0.2 → [0.3, 0.2, 0]/0.5.
    p = torch.tensor([[0.6, 0.2, 0.2], [0.4, 0.4, 0.2], [0.2, 0.2, 0.6]])
    x0 = torch.tensor([[3.0], [1.0], [0.0]])
    assert torch.allclose(refine(p, x0, 1), torch.tensor([[0.6], [0.4], [0.0]]))


def test_identity_transition_keeps_normalised_x0_and_sums_are_one():
    torch.manual_seed(0)
    x0 = torch.rand(50, 3)
    out = refine(torch.eye(50), x0, 10)
    assert torch.allclose(out, normalise_columns(x0))
    p = torch.softmax(torch.randn(50, 50), -1)
    out = refine(p, x0, 7)
    assert torch.allclose(out.sum(0), torch.ones(3), atol=1e-5)
    assert torch.all(out.amin(0) == 0)


def test_constant_column_becomes_uniform_not_nan():
    out = refine(torch.eye(4), torch.ones(4, 1), 3)
    assert torch.allclose(out, torch.full((4, 1), 0.25))


def test_batched_equals_single():
    torch.manual_seed(2)
    p = torch.softmax(torch.randn(3, 20, 20), -1)
    x0 = torch.rand(3, 20, 2)
    batched = refine(p, x0, 5)
    for i in range(3):
        assert torch.allclose(batched[i], refine(p[i], x0[i], 5), atol=1e-6)
