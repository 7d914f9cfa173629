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
from typing import Protocol

import torch
from torch import Tensor

from rlhf.algorithms.aggregation import Count, aggregate
from rlhf.algorithms.registry import Registry
from rlhf.algorithms.utils import Stats, detach_stats
from rlhf.errors import ConfigError


class DistillationLoss(Protocol):
    """Shared signature of every ``DISTILLATION_LOSSES`` entry."""

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


def _finish(
    name: str,
    per_token: Tensor,
    mask: Tensor,
    agg: str,
    global_tokens: Count | None,
    global_seqs: Count | None,
    constant_normalizer: Count | None,
) -> tuple[Tensor, Stats]:
    loss = aggregate(
        per_token,
        mask,
        agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        constant_normalizer=constant_normalizer,
    )
    return loss, detach_stats({"distill/loss": loss, f"distill/{name}": loss})


@DISTILLATION_LOSSES.register("forward_kl")
def forward_kl_loss(
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
    """Forward KL(teacher || student) per token, aggregated over real tokens.

    l_j = sum_v T_jv (log T_jv - log S_jv);  loss = aggregate(l, mask, agg)

    Hinton et al. 2015, arXiv:1503.02531 (without the temperature^2 factor); as OpenRLHF's
    ``KDLoss`` up to the teacher-entropy constant.

    Args:
        student_logits: ``[B, R, V]`` student logits (with gradient).
        teacher_logits: ``[B, R, V]`` teacher logits (detached here).
        mask: ``[B, R]`` real tokens.
        temperature: softmax temperature for both models (> 0).
        beta: unused (part of the shared signature).
        agg: a ``LOSS_AGGREGATIONS`` mode.
        global_tokens: see :func:`rlhf.algorithms.aggregation.aggregate`.
        global_seqs: see ``aggregate``.
        constant_normalizer: see ``aggregate``.

    Returns:
        ``(loss, stats)`` with stats ``distill/loss`` and ``distill/forward_kl``.
    """
    student, teacher = _log_softmaxes(student_logits, teacher_logits, temperature)
    per_token = _kl(teacher, student)
    return _finish("forward_kl", per_token, mask, agg, global_tokens, global_seqs, constant_normalizer)


@DISTILLATION_LOSSES.register("reverse_kl")
def reverse_kl_loss(
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
    """Reverse KL(student || teacher) per token, aggregated over real tokens.

    l_j = sum_v S_jv (log S_jv - log T_jv);  loss = aggregate(l, mask, agg)

    MiniLLM, Gu et al. 2023, arXiv:2306.08543 (reverse-KL objective, here as a full-vocabulary
    token-level loss); GKD's beta = 1 end point.

    Args:
        student_logits: ``[B, R, V]`` student logits (with gradient).
        teacher_logits: ``[B, R, V]`` teacher logits (detached here).
        mask: ``[B, R]`` real tokens.
        temperature: softmax temperature for both models (> 0).
        beta: unused (part of the shared signature).
        agg: a ``LOSS_AGGREGATIONS`` mode.
        global_tokens: see :func:`rlhf.algorithms.aggregation.aggregate`.
        global_seqs: see ``aggregate``.
        constant_normalizer: see ``aggregate``.

    Returns:
        ``(loss, stats)`` with stats ``distill/loss`` and ``distill/reverse_kl``.
    """
    student, teacher = _log_softmaxes(student_logits, teacher_logits, temperature)
    per_token = _kl(student, teacher)
    return _finish("reverse_kl", per_token, mask, agg, global_tokens, global_seqs, constant_normalizer)


@DISTILLATION_LOSSES.register("jsd")
def jsd_loss(
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
    """Generalised Jensen-Shannon divergence of GKD, per token, aggregated over real tokens.

    M   = beta * T + (1 - beta) * S
    l_j = beta * KL(T_j || M_j) + (1 - beta) * KL(S_j || M_j)
    beta = 0 gives exactly KL(T || S), beta = 1 exactly KL(S || T) (see the module docstring).

    Agarwal et al. 2023, arXiv:2306.13649 eq. 1; mixture computed in log space with logsumexp
    as in TRL's ``generalized_jsd_loss``.

    Args:
        student_logits: ``[B, R, V]`` student logits (with gradient).
        teacher_logits: ``[B, R, V]`` teacher logits (detached here).
        mask: ``[B, R]`` real tokens.
        temperature: softmax temperature for both models (> 0).
        beta: interpolation in [0, 1]; 0.5 is the symmetric JSD.
        agg: a ``LOSS_AGGREGATIONS`` mode.
        global_tokens: see :func:`rlhf.algorithms.aggregation.aggregate`.
        global_seqs: see ``aggregate``.
        constant_normalizer: see ``aggregate``.

    Returns:
        ``(loss, stats)`` with stats ``distill/loss`` and ``distill/jsd``.

    Raises:
        ConfigError: ``beta`` outside [0, 1].
    """
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"jsd beta must be in [0, 1], got {beta}")
    student, teacher = _log_softmaxes(student_logits, teacher_logits, temperature)
    if beta == 0.0:
        per_token = _kl(teacher, student)
    elif beta == 1.0:
        per_token = _kl(student, teacher)
    else:
        mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log(1.0 - beta)]), dim=0)
        per_token = beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)
    return _finish("jsd", per_token, mask, agg, global_tokens, global_seqs, constant_normalizer)


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
