"""Distillation losses: hand values, identical distributions, JSD end points and limits."""

import math

import pytest
import torch

from rlhf.algorithms.distillation import DISTILLATION_LOSSES, distillation_loss
from rlhf.errors import ConfigError

# one token, V = 2: teacher logits [0, 0] -> T = [0.5, 0.5]; student logits [ln 3, 0] -> S = [0.75, 0.25]
TEACHER = torch.tensor([[[0.0, 0.0]]])
STUDENT = torch.tensor([[[math.log(3.0), 0.0]]])
MASK = torch.ones(1, 1)
# KL(T || S) = 0.5 ln(0.5 / 0.75) + 0.5 ln(0.5 / 0.25) = 0.143841
FORWARD = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
# KL(S || T) = 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5) = 0.130812
REVERSE = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_forward_and_reverse_kl_hand_values():
    assert distillation_loss(STUDENT, TEACHER, MASK, kind="forward_kl")[0].item() == pytest.approx(FORWARD, rel=1e-5)
    assert distillation_loss(STUDENT, TEACHER, MASK, kind="reverse_kl")[0].item() == pytest.approx(REVERSE, rel=1e-5)


def test_jsd_end_points_are_forward_and_reverse_kl():
    assert distillation_loss(STUDENT, TEACHER, MASK, kind="jsd", beta=0.0)[0].item() == pytest.approx(FORWARD, rel=1e-5)
    assert distillation_loss(STUDENT, TEACHER, MASK, kind="jsd", beta=1.0)[0].item() == pytest.approx(REVERSE, rel=1e-5)


def test_jsd_near_the_end_points_scales_like_the_kls():
    # JSD_beta ~ beta * KL(T || S) as beta -> 0 and ~ (1 - beta) * KL(S || T) as beta -> 1
    small = 1e-3
    near_zero = distillation_loss(STUDENT.double(), TEACHER.double(), MASK, kind="jsd", beta=small)[0].item()
    near_one = distillation_loss(STUDENT.double(), TEACHER.double(), MASK, kind="jsd", beta=1 - small)[0].item()
    assert near_zero / small == pytest.approx(FORWARD, rel=1e-2)
    assert near_one / small == pytest.approx(REVERSE, rel=1e-2)


def test_symmetric_jsd_does_not_care_which_side_is_the_teacher():
    a = distillation_loss(STUDENT, TEACHER, MASK, kind="jsd", beta=0.5)[0]
    b = distillation_loss(TEACHER, STUDENT, MASK, kind="jsd", beta=0.5)[0]
    torch.testing.assert_close(a, b)
    assert 0 < a.item() <= math.log(2)


@pytest.mark.parametrize("kind", DISTILLATION_LOSSES.names())
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_identical_distributions_give_zero(kind, beta):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    loss, _ = distillation_loss(logits, logits.clone(), torch.ones(2, 3), kind=kind, beta=beta)
    assert abs(loss.item()) < 1e-6


def test_temperature_divides_the_logits():
    doubled_student, doubled_teacher = STUDENT * 2, TEACHER * 2
    at_two = distillation_loss(doubled_student, doubled_teacher, MASK, kind="forward_kl", temperature=2.0)[0]
    assert at_two.item() == pytest.approx(FORWARD, rel=1e-5)


def test_teacher_receives_no_gradient():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    distillation_loss(student, teacher, MASK, kind="jsd", beta=0.5)[0].backward()
    assert teacher.grad is None and student.grad is not None


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="beta"):
        distillation_loss(STUDENT, TEACHER, MASK, kind="jsd", beta=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        distillation_loss(STUDENT, TEACHER, MASK, temperature=0.0)
    with pytest.raises(ConfigError, match="known: jsd"):
        distillation_loss(STUDENT, TEACHER, MASK, kind="jsdd")
