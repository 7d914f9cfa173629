"""PPO / GSPO policy losses and truncated IS weights: hand-computed cases."""

import math

import pytest
import torch

from rlhf.algorithms.policy_losses import (
    compute_rollout_is_weights,
    gspo_loss,
    ppo_policy_loss,
)
from rlhf.errors import ConfigError


def _log(*ratios):
    return torch.log(torch.tensor([list(ratios)]))


def test_ppo_clip_hand_computed():
    # token 0: ratio 1.5, A = +1: max(-1.5, -1.2) = -1.2   (clipped)
    # token 1: ratio 0.9, A = +1: max(-0.9, -0.9) = -0.9   (inside the range)
    # token 2: ratio 1.5, A = -1: max( 1.5,  1.2) =  1.5   (unclipped term is the larger)
    # token_mean = (-1.2 - 0.9 + 1.5) / 3 = -0.2; clip_frac = 1/3
    logprobs = _log(1.5, 0.9, 1.5)
    old_logprobs = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, torch.ones(1, 3))
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert stats["policy/clip_frac"].item() == pytest.approx(1 / 3)
    assert stats["policy/dual_clip_frac"].item() == 0.0


def test_ppo_asymmetric_clip_higher():
    # ratio 1.3, A = +1 with clip_high = 0.28: clipped at 1.28 -> max(-1.3, -1.28) = -1.28
    loss, _ = ppo_policy_loss(_log(1.3), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip_high=0.28)
    assert loss.item() == pytest.approx(-1.28)
    # ratio 0.7, A = -1 with clip_low = 0.2: clipped at 0.8 -> max(0.7, 0.8) = 0.8
    loss, _ = ppo_policy_loss(_log(0.7), torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1), clip_low=0.2)
    assert loss.item() == pytest.approx(0.8)


def test_ppo_dual_clip_bounds_negative_advantages():
    # ratio 5, A = -1: PPO gives max(5, 1.2) = 5; dual clip c = 3 bounds it: min(5, 3) = 3
    loss, stats = ppo_policy_loss(_log(5.0), torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1), dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)
    assert stats["policy/dual_clip_frac"].item() == 1.0
    # positive advantages are untouched by the dual clip: ratio 5, A = +1 -> max(-5, -1.2) = -1.2
    loss, _ = ppo_policy_loss(_log(5.0), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), dual_clip=3.0)
    assert loss.item() == pytest.approx(-1.2)


def test_dual_clip_must_exceed_one():
    with pytest.raises(ConfigError, match="dual_clip"):
        ppo_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), dual_clip=0.5)


def test_approx_kl_is_k3_of_old_to_new():
    # ratio 2: k3 = ratio - 1 - log(ratio) = 1 - ln 2 = 0.30685
    _, stats = ppo_policy_loss(_log(2.0), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    assert stats["policy/approx_kl"].item() == pytest.approx(1 - math.log(2), rel=1e-5)


def test_on_policy_gradient_is_minus_advantage_over_tokens():
    # ratio = 1 with old = sg(new): d(-A * ratio)/d logprob = -A, token_mean over 3 tokens -> -A / 3
    logprobs = torch.randn(1, 3, requires_grad=True)
    advantages = torch.tensor([[1.0, -2.0, 0.5]])
    loss, _ = ppo_policy_loss(logprobs, logprobs.detach(), advantages, torch.ones(1, 3))
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -advantages / 3)


def test_rollout_is_weights_scale_the_per_token_loss():
    # one token, ratio 1, A = 1: loss -1; IS weight 0.5 -> -0.5
    weights = torch.tensor([[0.5]])
    loss, _ = ppo_policy_loss(
        torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), rollout_is_weights=weights
    )
    assert loss.item() == pytest.approx(-0.5)


def test_gspo_uses_the_length_normalised_sequence_ratio():
    # log-ratios [0.1, 0.3] -> s = exp(0.2) for both tokens; A = 1, wide clip (0.5) so nothing is clipped
    # loss = seq_mean_token_mean(-s) = -exp(0.2); d loss / d logprob_j = -s / |y| = -exp(0.2) / 2
    logprobs = torch.tensor([[0.1, 0.3]], requires_grad=True)
    loss, stats = gspo_loss(
        logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip_low=0.5, clip_high=0.5
    )
    loss.backward()
    assert loss.item() == pytest.approx(-math.exp(0.2))
    torch.testing.assert_close(logprobs.grad, torch.full((1, 2), -math.exp(0.2) / 2))
    assert stats["policy/clip_frac"].item() == 0.0


def test_gspo_default_clip_is_the_papers_tiny_range():
    # s = exp(0.2) = 1.22 > 1 + 4e-4: clipped to 1.0004 for A = +1, so loss = -1.0004 and no gradient
    logprobs = torch.tensor([[0.1, 0.3]], requires_grad=True)
    loss, stats = gspo_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    loss.backward()
    assert loss.item() == pytest.approx(-1.0004)
    assert stats["policy/clip_frac"].item() == 1.0
    assert (logprobs.grad == 0).all()


def test_gspo_masked_tokens_do_not_enter_the_sequence_ratio():
    # real log-ratios [0.2] with a padded 5.0: s = exp(0.2), not exp(2.6)
    loss, _ = gspo_loss(
        torch.tensor([[0.2, 5.0]]), torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1, 0]]), clip_low=1, clip_high=1
    )
    assert loss.item() == pytest.approx(-math.exp(0.2))


def test_truncated_is_weights_hand_computed():
    # ratios 3 and 0.5 with cap 2 -> [2, 0.5]; padded position -> 0
    old = torch.log(torch.tensor([[3.0, 0.5, 7.0]]))
    rollout = torch.zeros(1, 3)
    weights, _ = compute_rollout_is_weights(old, rollout, torch.tensor([[1, 1, 0]]), cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 0.0]]))
    assert not weights.requires_grad
    with pytest.raises(ConfigError, match="cap"):
        compute_rollout_is_weights(old, rollout, torch.ones(1, 3), cap=0.0)


def test_masked_is_weights_drop_tokens_outside_the_band():
    # ratios 3, 0.5, 0.4, 1.5 with cap 2: band [0.5, 2] keeps 0.5 and 1.5, masks 3 and 0.4; padded position -> 0
    old = torch.log(torch.tensor([[3.0, 0.5, 0.4, 1.5, 7.0]]))
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    weights, bounded = compute_rollout_is_weights(old, torch.zeros(1, 5), mask, cap=2.0, mode="mask")
    torch.testing.assert_close(weights, torch.tensor([[0.0, 0.5, 0.0, 1.5, 0.0]]))
    assert bounded.tolist() == [[True, False, True, False, False]]
    weights, bounded = compute_rollout_is_weights(old, torch.zeros(1, 5), mask, cap=2.0, mode="truncate")
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 0.4, 1.5, 0.0]]))
    assert bounded.tolist() == [[True, False, False, False, False]]
    with pytest.raises(ConfigError, match="truncate or mask"):
        compute_rollout_is_weights(old, old, mask, cap=2.0, mode="off")


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_is_weights_are_exactly_one_when_engine_and_trainer_agree(mode):
    logprobs = torch.randn(6, 9, generator=torch.Generator().manual_seed(0)) * 3 - 2  # not friendly: large spread
    weights, bounded = compute_rollout_is_weights(logprobs, logprobs.clone(), torch.ones(6, 9), cap=1.5, mode=mode)
    assert torch.equal(weights, torch.ones(6, 9)) and not bounded.any()
