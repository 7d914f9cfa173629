"""Clipped value loss: hand-computed cases."""

import pytest
import torch

from rlhf.algorithms.value_loss import value_loss


def test_clipped_error_is_taken_when_larger():
    # V = 1.5, V_old = 1.0, R = 2.0, clip 0.2: unclipped (1.5 - 2)^2 = 0.25;
    # V_clip = 1.2 -> (1.2 - 2)^2 = 0.64; 0.5 * max = 0.32 and the clip was active
    loss, stats = value_loss(torch.tensor([[1.5]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.32)
    assert stats["critic/value_clip_frac"].item() == 1.0


def test_inside_the_clip_range_it_is_half_squared_error():
    # V = 1.1 within 0.2 of V_old = 1.0: 0.5 * (1.1 - 2)^2 = 0.405
    loss, stats = value_loss(torch.tensor([[1.1]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.405)
    assert stats["critic/value_clip_frac"].item() == 0.0


def test_no_clip_range_is_plain_half_squared_error():
    # 0.5 * (1.5 - 2)^2 = 0.125 even though the clipped error would be larger
    loss, _ = value_loss(
        torch.tensor([[1.5]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), clip_range=None
    )
    assert loss.item() == pytest.approx(0.125)


def test_explained_variance_is_one_for_a_perfect_critic():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    _, stats = value_loss(returns.clone(), returns.clone(), returns, torch.ones(1, 4))
    assert stats["critic/vf_explained_var"].item() == pytest.approx(1.0)
    assert stats["critic/value_mean"].item() == pytest.approx(2.5)
