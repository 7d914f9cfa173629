"""Token-level distillation losses between a student and a teacher over the full vocabulary.

With S = softmax(student_logits / temperature) and T = softmax(teacher_logits / temperature) at
each position, and M = beta * T + (1 - beta) * S:

- ``forward_kl``: KL(T || S) = sum_v T_v (log T_v - log S_v)      (mode-covering, classic KD)
- ``reverse_kl``: KL(S || T) = sum_v S_v (log S_v - log T_v)      (mode-seeking, MiniLLM)
- ``jsd``:        beta * KL(T || M) + (1 - beta) * KL(S || M)     (generalised JSD, GKD)

Direction of ``beta`` (GKD, Agarwal et al. 2023, arXiv:2306.13649 eq. 1, with P = teacher and
Q = student, as in TRL's ``generalized_jsd_loss``): near beta = 0 the JSD behaves like
beta * KL(T || S) (forward KL), near beta = 1 like (1 - beta) * KL(S || T) (reverse KL). The raw
JSD vanishes at both ends, so ``jsd`` returns exactly the forward KL at beta = 0 and the reverse KL
at beta = 1 (TRL does the same).

The teacher is frozen: ``teacher_logits`` are detached. Logits are not multiplied by
temperature^2 afterwards (TRL's GKD convention); scale the loss yourself for Hinton-style KD.
Per-token values at masked positions are computed and then discarded, so they must be finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from rlhf.algorithms.aggregation import Count, aggregate
from rlhf.algorithms.registry import Registry
from rlhf.algorithms.utils import Stats, detach_stats
from rlhf.errors import ConfigError


class DistillationLoss(Protocol):
    """Shared signature of every ``DISTILLATION_LOSSES`` entry.

    Args:
        student_logits: ``[B, R, V]`` student logits (with gradient).
        teacher_logits: ``[B, R, V]`` teacher logits (detached inside).
        mask: ``[B, R]`` real tokens.
        temperature: softmax temperature for both models (> 0).
        beta: the JSD interpolation; the KL entries ignore it.
        agg: a ``LOSS_AGGREGATIONS`` mode.
        global_tokens, global_seqs, constant_normalizer: see :func:`rlhf.algorithms.aggregation.aggregate`.

    Returns:
        ``(loss, stats)`` with stats ``distill/loss`` and ``distill/<name>``.
    """

    def __call__(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor,
        *,
        temperature: float = ...,
        beta: float = ...,
        agg: str = ...,
        global_tokens: Count | None = ...,
        global_seqs: Count | None = ...,
        constant_normalizer: Count | None = ...,
    ) -> tuple[Tensor, Stats]: ...


DISTILLATION_LOSSES: Registry[DistillationLoss] = Registry("distillation loss")


def _log_softmaxes(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    if temperature <= 0:
        raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return student, teacher


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dimension from log-probabilities (finite logits assumed)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _divergence_loss(name: str, divergence: Callable[[Tensor, Tensor, float], Tensor]) -> DistillationLoss:
    """A full ``DistillationLoss`` from a per-token divergence of (student, teacher) log-probs and beta.

    Every entry shares the softmax-with-temperature front and the aggregation back, so each
    registered divergence holds only its own formula.
    """

    def loss_fn(
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor,
        *,
        temperature: float = 1.0,
        beta: float = 0.5,
        agg: str = "token_mean",
        global_tokens: Count | None = None,
        global_seqs: Count | None = None,
        constant_normalizer: Count | None = None,
    ) -> tuple[Tensor, Stats]:
        student, teacher = _log_softmaxes(student_logits, teacher_logits, temperature)
        per_token = divergence(student, teacher, beta)
        loss = aggregate(
            per_token,
            mask,
            agg,
            global_tokens=global_tokens,
            global_seqs=global_seqs,
            constant_normalizer=constant_normalizer,
        )
        return loss, detach_stats({"distill/loss": loss, f"distill/{name}": loss})

    loss_fn.__name__ = loss_fn.__qualname__ = f"{name}_loss"
    loss_fn.__doc__ = divergence.__doc__
    return DISTILLATION_LOSSES.register(name)(loss_fn)


def _forward_kl(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    """Forward KL(teacher || student) per token: l_j = sum_v T_jv (log T_jv - log S_jv).

    Hinton et al. 2015, arXiv:1503.02531 (without the temperature^2 factor); as OpenRLHF's
    ``KDLoss`` up to the teacher-entropy constant. ``beta`` is unused. Stats: ``distill/loss``,
    ``distill/forward_kl``.
    """
    return _kl(teacher, student)


def _reverse_kl(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    """Reverse KL(student || teacher) per token: l_j = sum_v S_jv (log S_jv - log T_jv).

    MiniLLM, Gu et al. 2023, arXiv:2306.08543 (reverse-KL objective, here as a full-vocabulary
    token-level loss); GKD's beta = 1 end point. ``beta`` is unused. Stats: ``distill/loss``,
    ``distill/reverse_kl``.
    """
    return _kl(student, teacher)


def _jsd(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD per token.

    M   = beta * T + (1 - beta) * S
    l_j = beta * KL(T_j || M_j) + (1 - beta) * KL(S_j || M_j)
    beta in [0, 1] (ConfigError otherwise); 0.5 is the symmetric JSD; beta = 0 gives exactly
    KL(T || S), beta = 1 exactly KL(S || T) (see the module docstring).

    Agarwal et al. 2023, arXiv:2306.13649 eq. 1; mixture computed in log space with logsumexp
    as in TRL's ``generalized_jsd_loss``. Stats: ``distill/loss``, ``distill/jsd``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(teacher, student)
    if beta == 1.0:
        return _kl(student, teacher)
    mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)


forward_kl_loss = _divergence_loss("forward_kl", _forward_kl)
reverse_kl_loss = _divergence_loss("reverse_kl", _reverse_kl)
jsd_loss = _divergence_loss("jsd", _jsd)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    agg: str = "token_mean",
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    constant_normalizer: Count | None = None,
) -> tuple[Tensor, Stats]:
    """Distillation loss looked up by ``kind`` in ``DISTILLATION_LOSSES``.

    ``forward_kl`` KL(T || S), ``reverse_kl`` KL(S || T), ``jsd`` the generalised JSD with
    ``beta`` (GKD, arXiv:2306.13649 eq. 1); formulas in the module docstring.

    Args:
        student_logits: ``[B, R, V]`` student logits (with gradient).
        teacher_logits: ``[B, R, V]`` teacher logits (detached).
        mask: ``[B, R]`` real tokens.
        kind: a ``DISTILLATION_LOSSES`` name.
        temperature: softmax temperature (> 0).
        beta: JSD interpolation (``jsd`` only).
        agg: a ``LOSS_AGGREGATIONS`` mode.
        global_tokens: see :func:`rlhf.algorithms.aggregation.aggregate`.
        global_seqs: see ``aggregate``.
        constant_normalizer: see ``aggregate``.

    Returns:
        ``(loss, stats)`` with stats ``distill/loss`` and ``distill/<kind>``.

    Raises:
        ConfigError: unknown ``kind`` or out-of-range ``temperature`` / ``beta``.
    """
    return DISTILLATION_LOSSES.get(kind)(
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        beta=beta,
        agg=agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        constant_normalizer=constant_normalizer,
    )
