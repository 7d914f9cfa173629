"""Policy-gradient losses for the actor: PPO clip (with DAPO's asymmetric clip and dual clip) and GSPO.

Every entry of ``POLICY_LOSSES`` has the signature of :class:`PolicyLoss` and returns
``(loss, stats)`` with at least ``policy/loss``, ``policy/clip_frac``, ``policy/dual_clip_frac``
and ``policy/approx_kl``, so dashboards do not depend on the chosen loss.

``policy/approx_kl`` is the k3 estimate of KL(pi_old || pi) from samples of pi_old:
mean(ratio - 1 - log(ratio)) over real tokens (CleanRL ``ppo.py``; always >= 0).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from rlhf.algorithms.aggregation import Count, aggregate
from rlhf.algorithms.registry import Registry
from rlhf.algorithms.utils import Stats, detach_stats, masked_mean
from rlhf.errors import ConfigError

LOG_RATIO_CLAMP = 20.0
"""Token log-ratios are clamped to [-20, 20] before ``exp`` (verl ``compute_policy_loss_vanilla``)."""

GSPO_LOG_RATIO_MAX = 10.0
"""GSPO's sequence log-ratio is clamped at 10 before ``exp`` (verl ``compute_policy_loss_gspo``)."""


class PolicyLoss(Protocol):
    """Shared signature of every ``POLICY_LOSSES`` entry."""

    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        clip_low: float = ...,
        clip_high: float = ...,
        dual_clip: float | None = ...,
        agg: str = ...,
        rollout_is_weights: Tensor | None = ...,
        global_tokens: Count | None = ...,
        global_seqs: Count | None = ...,
        constant_normalizer: Count | None = ...,
    ) -> tuple[Tensor, Stats]: ...


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def _clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token clipped surrogate loss and where each clip was active.

    loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
    and, with dual clip c > 1, for A < 0 only: loss = min(loss, -A * c).

    Returns:
        ``(loss [B, R], clipped [B, R] bool, dual_clipped [B, R] bool)``.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if dual_clip is None:
        return loss, is_clipped, torch.zeros_like(is_clipped)
    if dual_clip <= 1.0:
        raise ConfigError(f"dual_clip must be > 1 (arXiv:1912.09729 uses c = 3), got {dual_clip}")
    lower_bound = -advantages * dual_clip
    negative = advantages < 0
    is_dual_clipped = negative & (loss > lower_bound)
    loss = torch.where(negative, torch.minimum(loss, lower_bound), loss)
    return loss, is_clipped, is_dual_clipped


def _policy_stats(loss: Tensor, log_ratio: Tensor, is_clipped: Tensor, is_dual_clipped: Tensor, mask: Tensor) -> Stats:
    log_ratio = log_ratio.detach()
    approx_kl = torch.exp(log_ratio) - 1.0 - log_ratio
    stats = {
        "policy/loss": loss,
        "policy/clip_frac": masked_mean(is_clipped.to(log_ratio.dtype), mask),
        "policy/dual_clip_frac": masked_mean(is_dual_clipped.to(log_ratio.dtype), mask),
        "policy/approx_kl": masked_mean(approx_kl, mask),
    }
    return detach_stats(stats)


@POLICY_LOSSES.register("ppo")
def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token_mean",
    rollout_is_weights: Tensor | None = None,
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    constant_normalizer: Count | None = None,
) -> tuple[Tensor, Stats]:
    """PPO clipped surrogate loss with asymmetric clip, optional dual clip and IS correction.

    ratio_j = exp(logprobs_j - old_logprobs_j)
    l_j     = max(-A_j * ratio_j, -A_j * clip(ratio_j, 1 - clip_low, 1 + clip_high))
    l_j     = min(l_j, -A_j * dual_clip)               if dual_clip is set and A_j < 0
    l_j     = l_j * w_j                                if rollout_is_weights w are given
    loss    = aggregate(l, mask, agg)

    PPO: arXiv:1707.06347 eq. 7. Asymmetric "clip-higher" (clip_high > clip_low, e.g. 0.28 vs
    0.2): DAPO arXiv:2503.14476 §3.1. Dual clip (Ye et al. arXiv:1912.09729, dual-clip PPO,
    c = 3 there) bounds the loss of negative-advantage tokens whose ratio exploded. Importance weights correct for the
    rollout engine's logprobs differing from the trainer's (see
    :func:`compute_rollout_is_weights`). Follows verl ``compute_policy_loss_vanilla``
    (verl 012be9d, ``verl/trainer/ppo/core_algos.py``).

    Args:
        logprobs: ``[B, R]`` current-policy log-probabilities (with gradient).
        old_logprobs: ``[B, R]`` log-probabilities of the policy that generated the batch.
        advantages: ``[B, R]`` advantages.
        mask: ``[B, R]`` real response tokens.
        clip_low: ratio lower bound is 1 - clip_low.
        clip_high: ratio upper bound is 1 + clip_high.
        dual_clip: lower bound c > 1 of the dual clip, or ``None`` to disable it.
        agg: a ``LOSS_AGGREGATIONS`` mode.
        rollout_is_weights: ``[B, R]`` per-token weights (treated as constants), or ``None``.
        global_tokens: see :func:`rlhf.algorithms.aggregation.aggregate`.
        global_seqs: see ``aggregate``.
        constant_normalizer: see ``aggregate``.

    Returns:
        ``(loss, stats)`` with stats ``policy/loss``, ``policy/clip_frac`` (fraction of real tokens
        where the clipped term was taken), ``policy/dual_clip_frac`` (fraction bounded by the dual
        clip; 0 when it is off) and ``policy/approx_kl`` (k3 estimate of KL(pi_old || pi)).
    """
    real = mask.bool()
    log_ratio = torch.where(real, logprobs - old_logprobs, torch.zeros_like(logprobs))
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    advantages = torch.where(real, advantages, torch.zeros_like(advantages))
    loss_mat, is_clipped, is_dual_clipped = _clipped_surrogate(
        torch.exp(log_ratio), advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights.detach()
    loss = aggregate(
        loss_mat,
        mask,
        agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        constant_normalizer=constant_normalizer,
    )
    return loss, _policy_stats(loss, log_ratio, is_clipped, is_dual_clipped, mask)


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip: float | None = None,
    agg: str = "seq_mean_token_mean",
    rollout_is_weights: Tensor | None = None,
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    constant_normalizer: Count | None = None,
) -> tuple[Tensor, Stats]:
    """GSPO: the PPO clip applied to a length-normalised *sequence* importance ratio.

    s_i     = exp( (1/|y_i|) sum_j (logprobs_ij - old_logprobs_ij) )
    s_ij    = sg[s_i] * exp(logprobs_ij - sg[logprobs_ij])      (value s_i, gradient per token)
    l_ij    = max(-A_ij * s_ij, -A_ij * clip(s_ij, 1 - clip_low, 1 + clip_high))
    loss    = aggregate(l, mask, agg)

    Zheng et al. 2025, arXiv:2507.18071 eq. 5 (objective) and its GSPO-token form; with one
    advantage per sequence and ``agg="seq_mean_token_mean"`` (the default) the gradient equals
    sequence-level GSPO. The default clip range 3e-4 / 4e-4 is the paper's. The sequence
    log-ratio is clamped at 10 before ``exp``, as in verl ``compute_policy_loss_gspo`` (verl
    012be9d). ``dual_clip`` and ``rollout_is_weights`` act as in :func:`ppo_policy_loss`.

    Args:
        logprobs: ``[B, R]`` current-policy log-probabilities (with gradient).
        old_logprobs: ``[B, R]`` log-probabilities of the policy that generated the batch.
        advantages: ``[B, R]`` advantages (normally constant along each row).
        mask: ``[B, R]`` real response tokens.
        clip_low: sequence-ratio lower bound is 1 - clip_low.
        clip_high: sequence-ratio upper bound is 1 + clip_high.
        dual_clip: lower bound c > 1 of the dual clip, or ``None``.
        agg: a ``LOSS_AGGREGATIONS`` mode.
        rollout_is_weights: ``[B, R]`` per-token weights (constants), or ``None``.
        global_tokens: see :func:`rlhf.algorithms.aggregation.aggregate`.
        global_seqs: see ``aggregate``.
        constant_normalizer: see ``aggregate``.

    Returns:
        ``(loss, stats)`` with stats ``policy/loss``, ``policy/clip_frac``,
        ``policy/dual_clip_frac`` and ``policy/approx_kl`` (token-level k3 of KL(pi_old || pi)).
    """
    real = mask.bool()
    logprobs = torch.where(real, logprobs, torch.zeros_like(logprobs))
    token_log_ratio = torch.where(real, logprobs - old_logprobs, torch.zeros_like(logprobs))
    seq_log_ratio = masked_mean(token_log_ratio, mask, dim=-1)
    log_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1)
    log_ratio = log_ratio.clamp(max=GSPO_LOG_RATIO_MAX)
    advantages = torch.where(real, advantages, torch.zeros_like(advantages))
    loss_mat, is_clipped, is_dual_clipped = _clipped_surrogate(
        torch.exp(log_ratio), advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights.detach()
    loss = aggregate(
        loss_mat,
        mask,
        agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        constant_normalizer=constant_normalizer,
    )
    token_log_ratio = token_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return loss, _policy_stats(loss, token_log_ratio, is_clipped, is_dual_clipped, mask)


IS_MODES = ("truncate", "mask", "off")
"""How rollout importance weights w = exp(old - rollout) act on the policy loss (compute_rollout_is_weights)."""


def compute_rollout_is_weights(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    *,
    cap: float,
    mode: str = "truncate",
) -> tuple[Tensor, Tensor]:
    """Per-token importance weights between the trainer's old policy and the engine that sampled (the behaviour policy).

    w_j = exp(old_logprobs_j - rollout_logprobs_j)

    truncate (TIS)  min(w_j, cap): unbiased where w <= cap, bounded variance (Yao et al. 2025, "Your Efficient
                    RL Framework Secretly Brings You Off-Policy RL Training"; cap 2 there, in verl and OpenRLHF)
    mask (MIS)      w_j where 1/cap <= w_j <= cap, else 0: a token the two policies disagree on that much drops
                    out of the loss instead of being down-weighted (verl's rollout_is mask mode, whose lower bound
                    defaults to 1/upper)

    The engine samples with slightly different probabilities than the trainer computes for the same weights
    (kernels, dtype), and in the off-policy rollout modes from older weights; the weights correct the policy
    gradient for both.

    Args:
        old_logprobs: ``[B, R]`` trainer log-probabilities of the old policy.
        rollout_logprobs: ``[B, R]`` log-probabilities reported by the rollout engine.
        mask: ``[B, R]`` real response tokens.
        cap: the bound (> 0).
        mode: ``truncate`` or ``mask``.

    Returns:
        ``(weights, bounded)``: ``[B, R]`` weights without gradient, 0 at masked positions, and ``[B, R]`` bool,
        the real tokens whose weight the bound changed (truncated, or masked out).

    Raises:
        ConfigError: ``cap`` is not positive, or ``mode`` is not truncate/mask.
    """
    if cap <= 0:
        raise ConfigError(f"rollout IS cap must be > 0, got {cap}")
    if mode not in ("truncate", "mask"):
        raise ConfigError(f"rollout IS mode must be truncate or mask, got {mode!r}")
    real = mask.bool()
    with torch.no_grad():
        log_ratio = torch.where(real, old_logprobs - rollout_logprobs, torch.zeros_like(old_logprobs))
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        if mode == "truncate":
            bounded = real & (ratio > cap)
            weights = ratio.clamp(max=cap)
        else:
            bounded = real & ((ratio > cap) | (ratio < 1.0 / cap))
            weights = torch.where(bounded, torch.zeros_like(ratio), ratio)
        return torch.where(real, weights, torch.zeros_like(weights)), bounded
