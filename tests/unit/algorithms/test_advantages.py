"""Advantage estimators: hand-computed cases and invariants (group zero-mean, GAE = returns - values)."""

import math

import pytest
import torch

from rlhf.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_discounted_returns,
    compute_gae_advantages,
    compute_grpo_advantages,
    compute_reinforce_pp_advantages,
    compute_reinforce_pp_baseline_advantages,
    compute_rloo_advantages,
)
from rlhf.algorithms.utils import masked_mean, masked_var
from rlhf.errors import ConfigError


def _right_padded_mask(lengths, width):
    return torch.arange(width) < torch.tensor(lengths)[:, None]


def test_gae_hand_computed():
    # r = [0, 1], V = [0.5, 0.5], gamma = 1, lam = 0.5
    # delta_1 = 1 + 0 - 0.5 = 0.5          -> A_1 = 0.5
    # delta_0 = 0 + 0.5 - 0.5 = 0          -> A_0 = 0 + 1 * 0.5 * 0.5 = 0.25
    # returns = A + V = [0.75, 1.0]
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5]])
    mask = torch.ones(1, 2)
    advantages, returns = compute_gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.25, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[0.75, 1.0]]))


def test_gae_with_gamma_lam_one_is_returns_minus_values():
    torch.manual_seed(0)
    mask = _right_padded_mask([5, 3, 1], 5)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    advantages, returns = compute_gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    real_rewards = torch.where(mask, rewards, 0.0)
    suffix_sums = real_rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(returns, torch.where(mask, suffix_sums, 0.0))
    torch.testing.assert_close(advantages, torch.where(mask, suffix_sums - values, 0.0))


def test_gae_skips_holes_and_ignores_padding_values():
    # mask [1, 0, 1]: the hole is skipped, so token 0 bootstraps from token 2 (gamma = lam = 1)
    # A_2 = 2 - 1 = 1;  A_0 = (r_0 + V_2 - V_0) + A_2 = (1 + 1 - 0.5) + 1 = 2.5;  returns = A + V
    rewards = torch.tensor([[1.0, 50.0, 2.0]])
    values = torch.tensor([[0.5, -30.0, 1.0]])
    mask = torch.tensor([[1, 0, 1]])
    advantages, returns = compute_gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[2.5, 0.0, 1.0]]))
    torch.testing.assert_close(returns, torch.tensor([[3.0, 0.0, 2.0]]))


def test_gae_whiten_changes_advantages_only():
    torch.manual_seed(1)
    mask = _right_padded_mask([4, 2], 4)
    rewards, values = torch.randn(2, 4), torch.randn(2, 4)
    raw, raw_returns = compute_gae_advantages(rewards, values, mask)
    whitened, returns = compute_gae_advantages(rewards, values, mask, whiten=True)
    torch.testing.assert_close(returns, raw_returns)
    assert abs(masked_mean(whitened, mask).item()) < 1e-5
    assert abs(masked_var(whitened, mask).item() - 1.0) < 1e-4


def test_grpo_hand_computed():
    # group 7: scores [1, 0]: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / 0.7071 = +-0.7071
    # group 3: scores [1, 2, 3]: mean 2, std 1 -> [-1, 0, 1]
    scores = torch.tensor([1.0, 0.0, 1.0, 2.0, 3.0])
    group_ids = torch.tensor([7, 7, 3, 3, 3])
    mask = _right_padded_mask([2, 1, 3, 3, 2], 3)
    advantages, returns = compute_grpo_advantages(scores, mask, group_ids, eps=0.0)
    expected = torch.tensor([math.sqrt(0.5), -math.sqrt(0.5), -1.0, 0.0, 1.0])
    torch.testing.assert_close(advantages, torch.where(mask, expected[:, None], 0.0))
    torch.testing.assert_close(returns, advantages)


def test_grpo_is_zero_mean_within_each_group():
    torch.manual_seed(2)
    scores = torch.randn(12)
    group_ids = torch.arange(12) % 3  # interleaved groups of 4
    mask = torch.ones(12, 1)
    for norm_by_std in (True, False):
        advantages, _ = compute_grpo_advantages(scores, mask, group_ids, norm_by_std=norm_by_std)
        for g in range(3):
            assert abs(advantages[group_ids == g].sum().item()) < 1e-5


def test_dr_grpo_does_not_divide_by_std():
    # group [1, 2, 3]: mean 2 -> [-1, 0, 1] regardless of std; group [0, 10]: [-5, 5]
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 10.0])
    group_ids = torch.tensor([0, 0, 0, 1, 1])
    mask = torch.ones(5, 2)
    advantages, _ = ADVANTAGE_ESTIMATORS.get("dr_grpo")(scores=scores, mask=mask, group_ids=group_ids)
    torch.testing.assert_close(advantages[:, 0], torch.tensor([-1.0, 0.0, 1.0, -5.0, 5.0]))


def test_group_of_one_gives_zero_advantage_not_nan():
    scores = torch.tensor([5.0, 1.0, 2.0])
    group_ids = torch.tensor([0, 1, 1])
    mask = torch.ones(3, 2)
    for name in ("grpo", "dr_grpo", "rloo"):
        advantages, _ = ADVANTAGE_ESTIMATORS.get(name)(scores=scores, mask=mask, group_ids=group_ids)
        assert torch.isfinite(advantages).all()
        assert (advantages[0] == 0).all()


def test_rloo_hand_computed():
    # scores [1, 2, 3]: A_1 = 1 - (2+3)/2 = -1.5, A_2 = 2 - (1+3)/2 = 0, A_3 = 3 - (1+2)/2 = 1.5
    scores = torch.tensor([1.0, 2.0, 3.0])
    advantages, _ = compute_rloo_advantages(scores, torch.ones(3, 1), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(advantages[:, 0], torch.tensor([-1.5, 0.0, 1.5]))


def test_discounted_returns_hand_computed():
    # r = [1, 0, 2], gamma = 0.5: G_2 = 2, G_1 = 0 + 0.5 * 2 = 1, G_0 = 1 + 0.5 * 1 = 1.5
    returns = compute_discounted_returns(torch.tensor([[1.0, 0.0, 2.0, 9.0]]), torch.tensor([[1, 1, 1, 0]]), gamma=0.5)
    torch.testing.assert_close(returns, torch.tensor([[1.5, 1.0, 2.0, 0.0]]))


def test_reinforce_pp_whitens_returns_over_the_batch():
    torch.manual_seed(3)
    mask = _right_padded_mask([4, 2, 3], 4)
    rewards = torch.randn(3, 4)
    advantages, returns = compute_reinforce_pp_advantages(rewards, mask, gamma=1.0)
    torch.testing.assert_close(returns, compute_discounted_returns(rewards, mask))
    assert abs(masked_mean(advantages, mask).item()) < 1e-5
    assert abs(masked_var(advantages, mask).item() - 1.0) < 1e-4
    centred, _ = compute_reinforce_pp_advantages(rewards, mask, norm_by_std=False)
    torch.testing.assert_close(centred, torch.where(mask, returns - masked_mean(returns, mask), 0.0))


def test_reinforce_pp_baseline_subtracts_group_mean_score_first():
    # group scores [1, 3]: baseline 2 -> baselined scores [-1, +1] on the last token;
    # gamma = 1 so every real token's return is -1 (row 0) or +1 (row 1); whitening over
    # 4 tokens of -1 and +1 (unbiased std sqrt(4/3)) gives -+sqrt(3)/2
    scores = torch.tensor([1.0, 3.0])
    mask = torch.ones(2, 2)
    advantages, returns = compute_reinforce_pp_baseline_advantages(None, scores, mask, torch.tensor([0, 0]))
    torch.testing.assert_close(returns, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    half_root3 = math.sqrt(3) / 2
    torch.testing.assert_close(
        advantages, torch.tensor([[-half_root3, -half_root3], [half_root3, half_root3]]), atol=1e-4, rtol=1e-4
    )


def test_reinforce_pp_baseline_keeps_the_kl_part_of_token_rewards():
    # token rewards = KL part [-0.1, -0.1] + score on the last token; baseline removes only the score mean
    scores = torch.tensor([1.0, 3.0])
    mask = torch.ones(2, 2)
    kl_part = torch.full((2, 2), -0.1)
    token_rewards = kl_part + torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    _, returns = compute_reinforce_pp_baseline_advantages(token_rewards, scores, mask, torch.tensor([4, 4]))
    # row 0: last = -0.1 + 1 - 2 = -1.1, first = -0.1 + -1.1 = -1.2; row 1: 0.9 and 0.8
    torch.testing.assert_close(returns, torch.tensor([[-1.2, -1.1], [0.8, 0.9]]))


def test_registered_names():
    assert ADVANTAGE_ESTIMATORS.names() == sorted(
        ["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
    )


def test_missing_inputs_raise_config_error_naming_them():
    mask = torch.ones(2, 3)
    with pytest.raises(ConfigError, match="values"):
        ADVANTAGE_ESTIMATORS.get("gae")(scores=torch.ones(2), mask=mask)
    with pytest.raises(ConfigError, match="group_ids"):
        ADVANTAGE_ESTIMATORS.get("grpo")(scores=torch.ones(2), mask=mask)
    with pytest.raises(ConfigError, match="token_rewards or scores"):
        ADVANTAGE_ESTIMATORS.get("reinforce_pp")(mask=mask)


GROUP_SIZES = [2, 3, 5, 8, 16, 33, 64]
MAGNITUDES = [1e-3, 0.7, 1.3, 15.9, 1e3]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_group_gets_exactly_zero_advantage(name, dtype):
    # A group of equal scores carries no signal: every group estimator must give exactly 0
    # (arXiv:2402.03300 §4.1.2), not the float32 rounding of the group mean divided by a std of an
    # ulp (0.7 × 8 used to give 0.056 on every row, scores near 16 up to ±0.93).
    for size in GROUP_SIZES:
        for magnitude in MAGNITUDES:
            for value in (magnitude, -magnitude, magnitude * 1.1):
                scores = torch.full((2 * size,), value, dtype=dtype)
                scores[size:] = value / 3  # a second constant group with another value
                group_ids = torch.arange(2).repeat_interleave(size)
                mask = torch.ones(2 * size, 3, dtype=torch.bool)
                advantages, _ = ADVANTAGE_ESTIMATORS.get(name)(scores=scores, mask=mask, group_ids=group_ids)
                assert advantages.dtype == dtype
                assert torch.count_nonzero(advantages) == 0, (name, size, value)


@pytest.mark.parametrize("size", GROUP_SIZES)
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_grpo_matches_the_formula_in_float64_on_unfriendly_scores(size, magnitude):
    # non-binary scores of every magnitude: the float32 result equals the formula evaluated in float64
    generator = torch.Generator().manual_seed(size)
    scores64 = magnitude * (1 + torch.rand(size, generator=generator, dtype=torch.float64))
    scores = scores64.float()
    mask = torch.ones(size, 1, dtype=torch.bool)
    advantages, _ = compute_grpo_advantages(scores, mask, torch.zeros(size, dtype=torch.long), eps=0.0)
    exact = scores.double() - scores.double().mean()
    exact = exact / exact.pow(2).sum().div(size - 1).sqrt()
    torch.testing.assert_close(advantages[:, 0].double(), exact, rtol=1e-5, atol=1e-6)
    rloo, _ = compute_rloo_advantages(scores, mask, torch.zeros(size, dtype=torch.long))
    exact_rloo = scores.double() - (scores.double().sum() - scores.double()) / (size - 1)
    torch.testing.assert_close(rloo[:, 0].double(), exact_rloo, rtol=1e-5, atol=1e-6 * magnitude)


def test_whitening_a_constant_batch_gives_zero():
    # REINFORCE++ whitens over the batch: equal returns everywhere must whiten to 0, not to
    # rounding × rsqrt(1e-8)
    for value in (0.7, 1.3, 15.9, 1e3):
        token_rewards = torch.zeros(64, 4)
        token_rewards[:, -1] = value
        advantages, _ = compute_reinforce_pp_advantages(token_rewards, torch.ones(64, 4), gamma=1.0)
        assert torch.count_nonzero(advantages) == 0, value
