"""KL estimators, KL-in-reward, KL-as-loss and the KL coefficient controllers."""

import math

import pytest
import torch

from rlhf.algorithms.kl import (
    K3_MAX,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_in_reward,
    kl_loss,
    rollout_mismatch,
)
from rlhf.algorithms.utils import masked_mean
from rlhf.errors import ConfigError

LN2 = math.log(2)


def test_estimators_hand_values():
    # pi = 2 * pi_ref on the sampled token: log_ratio = ln 2
    # k1 = ln 2 = 0.6931;  k2 = 0.5 * (ln 2)^2 = 0.2402;  k3 = exp(-ln 2) + ln 2 - 1 = 0.1931
    logprobs, ref_logprobs = torch.tensor([LN2]), torch.tensor([0.0])
    assert kl_estimate(logprobs, ref_logprobs, "k1").item() == pytest.approx(LN2)
    assert kl_estimate(logprobs, ref_logprobs, "k2").item() == pytest.approx(0.5 * LN2**2)
    assert kl_estimate(logprobs, ref_logprobs, "k3").item() == pytest.approx(0.5 + LN2 - 1)


def test_k3_is_nonnegative_and_finite_for_extreme_ratios():
    torch.manual_seed(0)
    logprobs = torch.cat([torch.randn(1000) * 5, torch.tensor([100.0, -100.0])])
    ref_logprobs = torch.cat([torch.randn(1000) * 5, torch.tensor([-100.0, 100.0])])
    k3 = kl_estimate(logprobs, ref_logprobs, "k3")
    assert (k3 >= 0).all() and torch.isfinite(k3).all() and (k3 <= K3_MAX).all()
    assert (kl_estimate(logprobs, ref_logprobs, "k2") >= 0).all()


def test_identical_policies_have_zero_kl():
    logprobs = torch.randn(3, 4)
    for kind in KL_ESTIMATORS:
        assert (kl_estimate(logprobs, logprobs.clone(), kind) == 0).all()


def test_kl_in_reward_hand_computed():
    # k1 = 0.5 on every token, kl_coef 0.1 -> -0.05 per real token; scores on the last real token
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logprobs, ref_logprobs = torch.full((2, 3), 0.5), torch.zeros(2, 3)
    rewards = kl_in_reward(torch.tensor([1.0, 2.0]), logprobs, ref_logprobs, mask, kl_coef=0.1, kind="k1")
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.05, 0.95], [-0.05, 1.95, 0.0]]))


def test_kl_loss_is_the_aggregated_estimate_and_ignores_padding():
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logprobs, ref_logprobs = torch.randn(2, 3), torch.randn(2, 3)
    loss, stats = kl_loss(logprobs, ref_logprobs, mask, kind="k3")
    torch.testing.assert_close(loss, masked_mean(kl_estimate(logprobs, ref_logprobs, "k3"), mask))
    garbage = logprobs.clone()
    garbage[~mask.bool()] = 1e6
    torch.testing.assert_close(kl_loss(garbage, ref_logprobs, mask, kind="k3")[0], loss)
    assert set(stats) == {"policy/kl_loss", "policy/ref_kl_k1"}


def test_adaptive_controller_moves_towards_the_target():
    # KL far above target: error clipped to +0.2, n_steps = horizon -> value * 1.2
    high = AdaptiveKLController(0.1, target=1.0, horizon=100)
    high.update(current_kl=10.0, n_steps=100)
    assert high.value == pytest.approx(0.12)
    # KL below target: error = 0.5 / 1 - 1 = -0.5 -> clipped -0.2; n_steps / horizon = 0.5 -> * 0.9
    low = AdaptiveKLController(0.1, target=1.0, horizon=100)
    low.update(current_kl=torch.tensor(0.5), n_steps=50)
    assert low.value == pytest.approx(0.09)
    # on target: unchanged
    on = AdaptiveKLController(0.1, target=1.0, horizon=100)
    on.update(current_kl=1.0, n_steps=100)
    assert on.value == pytest.approx(0.1)


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=1000)
    assert controller.value == 0.05


def test_controllers_reject_bad_settings():
    with pytest.raises(ConfigError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ConfigError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
    with pytest.raises(ConfigError, match="kl_coef"):
        FixedKLController(-1.0)


def test_rollout_mismatch_hand_values():
    """KL(engine || trainer) by k3 on the engine's samples: per token exp(t - e) - (t - e) - 1, padding ignored."""
    engine = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -9.0]])
    trainer = torch.tensor([[-1.0, -2.0 - LN2, 5.0], [-0.5 + LN2, -0.5, 3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    stats = rollout_mismatch(engine, trainer, mask)
    half = 0.5 + LN2 - 1  # t - e = -ln 2
    double = 2.0 - LN2 - 1  # t - e = +ln 2
    assert stats["rollout/logprob_diff"] == pytest.approx(LN2 / 2)
    assert stats["rollout/mismatch_kl"] == pytest.approx((half + double) / 4)
    assert stats["rollout/mismatch_kl_max"] == pytest.approx(double / 2)  # row 2's mean; row 1 has half / 2
    same = rollout_mismatch(engine, engine.clone(), mask)
    assert all(float(v) == 0.0 for v in same.values())
    empty = rollout_mismatch(engine, trainer, torch.zeros_like(mask))
    assert all(float(v) == 0.0 for v in empty.values())


def test_rollout_mismatch_of_a_truncated_engine_distribution_is_the_kept_mass():
    """An engine reporting top-k/top-p logprobs (renormalised over the mass m it kept) against the trainer's full
    distribution: t - e = log m on every token, so k3 = m - log m - 1 (0.19 at m = 0.5, 0.005 at m = 0.9)."""
    for kept in (0.5, 0.9):
        engine = torch.full((2, 4), -1.0)
        stats = rollout_mismatch(engine, engine + math.log(kept), torch.ones(2, 4))
        assert stats["rollout/mismatch_kl"] == pytest.approx(kept - math.log(kept) - 1, abs=1e-6)  # float32
