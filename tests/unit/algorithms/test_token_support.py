"""Top-k + tail supports: proper distributions, exact at full coverage, lower bounds otherwise, finite gradients."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algorithms import DISTILLATION_LOSSES
from rlhf.algorithms.token_support import LOG_FLOOR, student_support, teacher_support


def logits(seed: int, shape=(2, 3, 40), scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_hand_computed_support():
    # teacher probs [0.5, 0.3, 0.2] -> top-2 keeps 0.5, 0.3 and a tail of 0.2;
    # student probs [0.2, 0.2, 0.6] on the same tokens: 0.2, 0.2 and a tail of 0.6
    teacher = torch.tensor([0.5, 0.3, 0.2]).log().view(1, 1, 3)
    student = torch.tensor([0.2, 0.2, 0.6]).log().view(1, 1, 3)
    t, ids = teacher_support(teacher, top_k=2)
    assert ids.tolist() == [[[0, 1]]]
    torch.testing.assert_close(t.exp(), torch.tensor([[[0.5, 0.3, 0.2]]]))
    torch.testing.assert_close(student_support(student, ids).exp(), torch.tensor([[[0.2, 0.2, 0.6]]]))


@pytest.mark.parametrize("top_k", [1, 4, 16, 39])
def test_supports_are_distributions_and_bound_the_full_divergence(top_k):
    t_logits, s_logits = logits(0), logits(1)
    teacher, ids = teacher_support(t_logits, top_k=top_k, temperature=2.0)
    student = student_support(s_logits, ids, temperature=2.0)
    assert teacher.shape == student.shape == (2, 3, top_k + 1)
    torch.testing.assert_close(teacher.exp().sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(student.exp().sum(-1), torch.ones(2, 3))
    mask = torch.ones(2, 3)
    for name in DISTILLATION_LOSSES.names():
        on_support, _ = DISTILLATION_LOSSES.get(name)(student, teacher, mask)
        full, _ = DISTILLATION_LOSSES.get(name)(s_logits, t_logits, mask, temperature=2.0)
        # merging outcomes never increases an f-divergence (data-processing inequality)
        assert on_support <= full + 1e-5, name


def test_full_vocab_ships_everything_and_matches_the_full_loss():
    t_logits, s_logits = logits(2), logits(3)
    for top_k in (0, 40, 100):
        teacher, ids = teacher_support(t_logits, top_k=top_k)
        assert ids is None and teacher.shape == (2, 3, 40)
    teacher, _ = teacher_support(t_logits, top_k=0)
    student = student_support(s_logits, None)
    mask = torch.ones(2, 3)
    on_support, _ = DISTILLATION_LOSSES.get("jsd")(student, teacher, mask, beta=0.3)
    full, _ = DISTILLATION_LOSSES.get("jsd")(s_logits, t_logits, mask, beta=0.3)
    torch.testing.assert_close(on_support, full)


def test_empty_tail_stays_finite_with_finite_gradients():
    # a teacher that puts all its mass on two tokens: the tail is exp(-inf) -> clamped to LOG_FLOOR
    t_logits = torch.full((1, 2, 10), -1e30)
    t_logits[..., :2] = 0.0
    teacher, ids = teacher_support(t_logits, top_k=2)
    assert teacher[..., -1].eq(LOG_FLOOR).all()
    s_logits = logits(4, (1, 2, 10)).requires_grad_()
    student = student_support(s_logits, ids)
    for name in DISTILLATION_LOSSES.names():
        loss, _ = DISTILLATION_LOSSES.get(name)(student, teacher, torch.ones(1, 2))
        (grad,) = torch.autograd.grad(loss, s_logits, retain_graph=True)
        assert math.isfinite(loss.item()) and torch.isfinite(grad).all(), name
