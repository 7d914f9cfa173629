"""Critic loss: clipped squared error to the returns (PPO2 style)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algorithms.aggregation import Count, aggregate
from rlhf.algorithms.utils import Stats, detach_stats, masked_mean, masked_var


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float | None = 0.2,
    agg: str = "token_mean",
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    constant_normalizer: Count | None = None,
) -> tuple[Tensor, Stats]:
    """Clipped value loss: the larger of the clipped and unclipped squared errors, halved.

    V_clip = old_values + clip(values - old_values, -clip_range, clip_range)
    l_j    = 0.5 * max((values_j - returns_j)^2, (V_clip_j - returns_j)^2)
    loss   = aggregate(l, mask, agg)

    The clipped form comes from OpenAI baselines' PPO2 (arXiv:1707.06347 describes the unclipped
    squared error, eq. 9); OpenRLHF ``ValueLoss`` and verl ``compute_value_loss`` use the same
    0.5 * max(...) form (OpenRLHF 09f5ace ``openrlhf/models/loss.py``). ``clip_range=None``
    gives the plain 0.5 * (values - returns)^2.

    Args:
        values: ``[B, R]`` current critic predictions (with gradient).
        old_values: ``[B, R]`` critic predictions at rollout time.
        returns: ``[B, R]`` value targets (e.g. GAE returns).
        mask: ``[B, R]`` real response tokens.
        clip_range: how far ``values`` may move from ``old_values`` before the clip bites.
        agg: a ``LOSS_AGGREGATIONS`` mode.
        global_tokens: see :func:`rlhf.algorithms.aggregation.aggregate`.
        global_seqs: see ``aggregate``.
        constant_normalizer: see ``aggregate``.

    Returns:
        ``(loss, stats)`` with stats ``critic/loss``, ``critic/value_clip_frac`` (fraction of real
        tokens where the clipped error was the larger; 0 without clipping),
        ``critic/vf_explained_var`` (1 - Var(returns - values) / Var(returns), over real tokens)
        and ``critic/value_mean``.
    """
    real = mask.bool()
    zeros = torch.zeros_like(values)
    values = torch.where(real, values, zeros)
    old_values = torch.where(real, old_values, zeros)
    returns = torch.where(real, returns, zeros)

    unclipped = (values - returns) ** 2
    if clip_range is None:
        loss_mat = unclipped
        is_clipped = torch.zeros_like(real)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (clipped_values - returns) ** 2
        loss_mat = torch.maximum(unclipped, clipped)
        is_clipped = clipped > unclipped
    loss = 0.5 * aggregate(
        loss_mat,
        mask,
        agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        constant_normalizer=constant_normalizer,
    )

    detached = values.detach()
    explained_var = 1.0 - masked_var(returns - detached, mask) / masked_var(returns, mask).clamp(min=1e-8)
    stats = {
        "critic/loss": loss,
        "critic/value_clip_frac": masked_mean(is_clipped.to(detached.dtype), mask),
        "critic/vf_explained_var": explained_var,
        "critic/value_mean": masked_mean(detached, mask),
    }
    return loss, detach_stats(stats)
