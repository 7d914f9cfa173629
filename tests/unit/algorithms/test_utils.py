"""Masked reductions: hand-computed values and masked-position invariance."""

import math

import torch

from rlhf.algorithms.utils import (
    last_token_mask,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    scatter_to_last_token,
    sequence_logprobs,
)

VALUES = torch.tensor([[1.0, 2.0, 99.0], [4.0, -7.0, 99.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean_hand_values():
    # real values 1, 2, 4: sum 7, mean 7/3; per row: [1+2, 4] and means [1.5, 4]
    assert masked_sum(VALUES, MASK).item() == 7.0
    assert math.isclose(masked_mean(VALUES, MASK).item(), 7 / 3, rel_tol=1e-6)
    torch.testing.assert_close(masked_sum(VALUES, MASK, dim=-1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(VALUES, MASK, dim=-1), torch.tensor([1.5, 4.0]))


def test_masked_mean_of_nothing_is_zero_not_nan():
    assert masked_mean(VALUES, torch.zeros_like(MASK)).item() == 0.0
    torch.testing.assert_close(masked_mean(VALUES, torch.zeros_like(MASK), dim=-1), torch.zeros(2))


def test_masked_var_hand_value():
    # 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9; unbiased / 2 = 7/3, biased / 3 = 14/9
    assert math.isclose(masked_var(VALUES, MASK).item(), 7 / 3, rel_tol=1e-6)
    assert math.isclose(masked_var(VALUES, MASK, unbiased=False).item(), 14 / 9, rel_tol=1e-6)
    # one real value: variance 0, not a division by zero
    assert masked_var(VALUES, torch.tensor([[1, 0, 0], [0, 0, 0]])).item() == 0.0


def test_masked_whiten_zero_mean_unit_var_and_zero_at_masked():
    torch.manual_seed(0)
    values = torch.randn(4, 6) * 3 + 2
    mask = torch.rand(4, 6) > 0.3
    whitened = masked_whiten(values, mask)
    assert abs(masked_mean(whitened, mask).item()) < 1e-5
    assert abs(masked_var(whitened, mask).item() - 1.0) < 1e-4
    assert (whitened[~mask] == 0).all()
    kept_mean = masked_whiten(values, mask, shift_mean=False)
    assert math.isclose(masked_mean(kept_mean, mask).item(), masked_mean(values, mask).item(), rel_tol=1e-5)


def test_masked_values_never_change_results():
    garbage = VALUES.clone()
    garbage[~MASK.bool()] = torch.tensor([float("nan"), float("inf"), -1e30])
    for fn in (masked_sum, masked_mean):
        torch.testing.assert_close(fn(garbage, MASK), fn(VALUES, MASK))
    torch.testing.assert_close(masked_var(garbage, MASK), masked_var(VALUES, MASK))


def test_sequence_logprobs_sum_and_average():
    # row 0: 1 + 2 = 3 over 2 tokens; row 1: 4 over 1 token
    torch.testing.assert_close(sequence_logprobs(VALUES, MASK), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(sequence_logprobs(VALUES, MASK, average=True), torch.tensor([1.5, 4.0]))


def test_last_token_mask_handles_padding_holes_and_empty_rows():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    expected = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]).bool()
    assert torch.equal(last_token_mask(mask), expected)
    placed = scatter_to_last_token(torch.tensor([1.0, 2.0, 3.0]), mask)
    torch.testing.assert_close(placed, torch.tensor([[0, 0, 1.0, 0], [0, 0, 2.0, 0], [0, 0, 0, 0.0]]))
