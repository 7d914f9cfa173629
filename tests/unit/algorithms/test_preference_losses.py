"""DPO family, SimPO, ORPO, KTO and the reward-model loss: hand-computed cases."""

import math

import pytest
import torch

from rlhf.algorithms.preference_losses import (
    PREFERENCE_LOSSES,
    dpo_loss,
    kto_loss,
    orpo_loss,
    pairwise_reward_loss,
    simpo_loss,
)
from rlhf.errors import ConfigError


def _softplus(x):
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


def _pair(h_chosen, h_rejected):
    """Policy / reference logps with policy - ref = h_chosen (chosen) and h_rejected (rejected)."""
    ref_chosen, ref_rejected = torch.tensor([-10.0]), torch.tensor([-12.0])
    return ref_chosen + h_chosen, ref_rejected + h_rejected, ref_chosen, ref_rejected


def test_dpo_is_log_two_when_policy_equals_reference():
    logps = torch.randn(4)
    for loss_type in ("sigmoid", "hinge"):
        loss, stats = dpo_loss(logps, logps - 1, logps, logps - 1, loss_type=loss_type)
        expected = math.log(2) if loss_type == "sigmoid" else 1.0  # hinge: relu(1 - 0) = 1
        assert loss.item() == pytest.approx(expected)
        assert stats["dpo/margin"].item() == 0.0


def test_dpo_sigmoid_hand_computed():
    # h = 0.5 - (-0.5) = 1, beta = 1: -log sigmoid(1) = log(1 + e^-1) = 0.31326
    inputs = _pair(0.5, -0.5)
    loss, stats = dpo_loss(*inputs, beta=1.0)
    assert loss.item() == pytest.approx(_softplus(-1.0), rel=1e-6)
    # rewards beta * (policy - ref): chosen 0.5, rejected -0.5, accuracy 1, margin 1
    assert stats["dpo/chosen_reward"].item() == pytest.approx(0.5)
    assert stats["dpo/rejected_reward"].item() == pytest.approx(-0.5)
    assert stats["dpo/reward_accuracy"].item() == 1.0
    assert stats["dpo/margin"].item() == pytest.approx(1.0)


def test_cdpo_label_smoothing_hand_computed():
    # eps = 0.1, h = 1: 0.9 * softplus(-1) + 0.1 * softplus(1) = 0.9 * 0.31326 + 0.1 * 1.31326 = 0.41326
    loss, _ = dpo_loss(*_pair(0.5, -0.5), beta=1.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * _softplus(-1.0) + 0.1 * _softplus(1.0), rel=1e-6)


def test_ipo_hand_computed():
    # h = 1, tau = beta = 0.25: target 1 / (2 * 0.25) = 2 -> (1 - 2)^2 = 1
    loss, _ = dpo_loss(*_pair(0.5, -0.5), beta=0.25, loss_type="ipo")
    assert loss.item() == pytest.approx(1.0)
    # h = 2 hits the target exactly: loss 0
    loss, _ = dpo_loss(*_pair(1.0, -1.0), beta=0.25, loss_type="ipo")
    assert loss.item() == pytest.approx(0.0)


def test_hinge_hand_computed():
    # h = 1, beta = 0.5: relu(1 - 0.5) = 0.5;  h = 4: relu(1 - 2) = 0
    assert dpo_loss(*_pair(0.5, -0.5), beta=0.5, loss_type="hinge")[0].item() == pytest.approx(0.5)
    assert dpo_loss(*_pair(2.0, -2.0), beta=0.5, loss_type="hinge")[0].item() == 0.0


def test_label_smoothing_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="label_smoothing"):
        dpo_loss(*_pair(0.5, -0.5), loss_type="ipo", label_smoothing=0.1)


def test_unknown_dpo_variant_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        dpo_loss(*_pair(0.5, -0.5), loss_type="sigmod")
    assert "known: sigmoid" in str(err.value)
    assert set(PREFERENCE_LOSSES.names()) == {"sigmoid", "ipo", "hinge"}


def test_simpo_hand_computed():
    # avg logps -1 / -2, beta 2, gamma = 2 * 0.5 = 1: -log sigmoid(2 * 1 - 1) = softplus(-1) = 0.31326
    loss, stats = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma_beta_ratio=0.5)
    assert loss.item() == pytest.approx(_softplus(-1.0), rel=1e-6)
    assert stats["simpo/margin"].item() == pytest.approx(2.0)


def test_simpo_matches_trl_with_simpo_gamma_equal_to_beta_times_the_ratio():
    """TRL's CPO loss_type="simpo": -log sigmoid(beta * ((c - r) - simpo_gamma / beta)); its simpo_gamma is the
    margin gamma itself, so ours with gamma_beta_ratio = g / beta equals TRL's with simpo_gamma = g."""
    chosen, rejected = torch.tensor([-0.7, -1.9, -0.2]), torch.tensor([-1.1, -0.4, -3.0])
    beta, ratio = 2.5, 0.3
    simpo_gamma = beta * ratio  # 0.75, what TRL's config would need
    trl = -torch.nn.functional.logsigmoid(beta * ((chosen - rejected) - simpo_gamma / beta)).mean()
    loss, _ = simpo_loss(chosen, rejected, beta=beta, gamma_beta_ratio=ratio)
    assert loss.item() == pytest.approx(trl.item(), rel=1e-6)
    # passing TRL's simpo_gamma as the ratio (the old docstring's advice) is a different loss at beta != 1
    wrong, _ = simpo_loss(chosen, rejected, beta=beta, gamma_beta_ratio=simpo_gamma)
    assert wrong.item() != pytest.approx(trl.item(), rel=1e-3)
    doc = " ".join(simpo_loss.__doc__.split())
    assert "simpo_gamma`` is gamma = ``beta * gamma_beta_ratio``" in doc


def test_orpo_hand_computed():
    # chosen p = 0.5 -> log odds ln(0.5 / 0.5) = 0; rejected p = 0.2 -> ln(0.2 / 0.8) = -ln 4
    # L_OR = -log sigmoid(ln 4) = log(1 + 1/4) = 0.22314; loss = nll 1.0 + 0.1 * 0.22314 = 1.022314
    chosen, rejected = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    loss, stats = orpo_loss(chosen, rejected, torch.tensor([1.0]), beta=0.1)
    assert loss.item() == pytest.approx(1.0 + 0.1 * math.log(1.25), rel=1e-6)
    assert stats["orpo/log_odds_ratio"].item() == pytest.approx(math.log(4), rel=1e-6)


def test_orpo_is_stable_near_probability_one_and_zero():
    chosen = torch.tensor([-1e-9, -1e-3, -60.0], requires_grad=True)
    rejected = torch.tensor([-80.0, -0.5, -1e-12], requires_grad=True)
    loss, _ = orpo_loss(chosen, rejected, torch.ones(3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_kto_hand_computed():
    # r = policy - ref = [1, -1], desirable [True, False], z0 = 0.5, beta = 1
    # desirable:   1 - sigmoid(1 - 0.5)    = 1 - 0.62246 = 0.37754
    # undesirable: 1 - sigmoid(0.5 - (-1)) = 1 - 0.81757 = 0.18243;  mean = 0.27998
    policy, ref = torch.tensor([1.0, -1.0], requires_grad=True), torch.zeros(2)
    kl_reference = torch.tensor(0.5, requires_grad=True)
    loss, stats = kto_loss(policy, ref, torch.tensor([True, False]), kl_reference, beta=1.0)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss.item() == pytest.approx(((1 - sigmoid(0.5)) + (1 - sigmoid(1.5))) / 2, rel=1e-6)
    assert stats["kto/kl"].item() == 0.5
    assert stats["kto/chosen_reward"].item() == 1.0 and stats["kto/rejected_reward"].item() == -1.0
    loss.backward()
    assert kl_reference.grad is None  # the reference point is detached


def test_kto_clamps_a_negative_kl_reference_and_weights_classes():
    # z0 = max(-3, 0) = 0; r = 0 -> every term is weight * (1 - sigmoid(0)) = weight * 0.5
    # weights 2 (desirable) and 1 (undesirable): mean(2 * 0.5, 1 * 0.5) = 0.75
    loss, stats = kto_loss(
        torch.zeros(2), torch.zeros(2), torch.tensor([1, 0]), torch.tensor([-3.0, -3.0]), desirable_weight=2.0
    )
    assert loss.item() == pytest.approx(0.75)
    assert stats["kto/kl"].item() == 0.0


def test_pairwise_reward_loss_hand_computed():
    # equal rewards: -log sigmoid(0) = ln 2; accuracy 0 (not strictly greater)
    loss, stats = pairwise_reward_loss(torch.tensor([1.0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["rm/accuracy"].item() == 0.0
    # rc = 2, rr = 1, margin 1: -log sigmoid(2 - 1 - 1) = ln 2; accuracy 1
    loss, stats = pairwise_reward_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["rm/accuracy"].item() == 1.0
