"""Masked reductions shared by every algorithm module.

A mask is read as ``mask != 0``: a float mask marks tokens, it never weights them (use
``rollout_is_weights`` or an explicit multiplication for weights). Positions where the mask is 0
are selected away with ``torch.where``, so whatever finite garbage sits there cannot leak into a
result, not even as ``0 * nan``.
"""

from __future__ import annotations

import torch
from torch import Tensor

Stats = dict[str, Tensor]
"""Metric name -> detached 0-d tensor. Keys are namespaced (``policy/``, ``critic/``, ...)."""


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is nonzero.

    Args:
        values: any shape, e.g. ``[B, R]``.
        mask: same shape as ``values`` (float or bool).
        dim: reduce over this dimension only; ``None`` reduces everything to a 0-d tensor.

    Returns:
        The masked sum, 0-d or with ``dim`` removed.
    """
    selected = torch.where(mask.bool(), values, torch.zeros_like(values))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is nonzero.

    mean = sum(values * mask) / max(sum(mask), 1), so an all-masked input gives 0, not NaN.

    Args:
        values: any shape, e.g. ``[B, R]``.
        mask: same shape as ``values``.
        dim: reduce over this dimension only; ``None`` reduces everything.

    Returns:
        The masked mean, 0-d or with ``dim`` removed.
    """
    count = masked_sum(torch.ones_like(values), mask, dim=dim)
    return masked_sum(values, mask, dim=dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over all positions where ``mask`` is nonzero (0-d).

    var = sum(mask * (values - mean)^2) / (n - 1)   (unbiased, n = number of real positions)
    The denominator is clamped at 1, so a single real position gives variance 0.

    Args:
        values: any shape.
        mask: same shape as ``values``.
        unbiased: Bessel's correction (n - 1) instead of n.

    Returns:
        0-d tensor.
    """
    mean = masked_mean(values, mask)
    sq_dev = masked_sum((values - mean) ** 2, mask)
    count = masked_sum(torch.ones_like(values), mask)
    denom = count - 1 if unbiased else count
    return sq_dev / denom.clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``values`` to unit variance (and zero mean) over the real positions.

    whitened = (values - mean) / sqrt(var + eps); with ``shift_mean=False`` the mean is added
    back, so only the scale changes. Statistics use the unbiased masked variance. Positions where
    the mask is 0 are set to 0.

    Args:
        values: any shape, typically ``[B, R]``.
        mask: same shape as ``values``.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance before the square root.

    Returns:
        Tensor shaped like ``values``.
    """
    # float64 statistics: a float32 mean of equal values is an ulp off, and rsqrt(var + eps)
    # would scale that rounding by up to 1e4 into a spurious signal; in float64 it is exact.
    wide = values.to(torch.float64)
    mean = masked_mean(wide, mask)
    var = masked_var(wide, mask)
    whitened = (wide - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened.to(values.dtype), torch.zeros_like(values))


def sequence_logprobs(logprobs: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Per-sequence log-probability of the response: the masked sum (or mean) over tokens.

    log p(y | x) = sum_j mask_j * logprobs_j; with ``average=True`` it is divided by the number of
    real tokens (the length-normalised form SimPO and ORPO take).

    Args:
        logprobs: ``[B, R]`` per-token log-probabilities of the response tokens.
        mask: ``[B, R]`` real response tokens.
        average: divide by the response length.

    Returns:
        ``[B]`` tensor.
    """
    if average:
        return masked_mean(logprobs, mask, dim=-1)
    return masked_sum(logprobs, mask, dim=-1)


def last_token_mask(mask: Tensor) -> Tensor:
    """Bool ``[B, R]`` marking the last real token of each row (all False for an empty row).

    Works for any mask, not only right padding: it picks the largest index whose mask is set.
    """
    real = mask.bool()
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(real)
    last = torch.where(real, positions, torch.full_like(positions, -1)).max(dim=-1, keepdim=True).values
    return (positions == last) & real


def scatter_to_last_token(scores: Tensor, mask: Tensor) -> Tensor:
    """Place a per-sequence value ``[B]`` on the last real token of each row, 0 elsewhere.

    Returns:
        ``[B, R]`` tensor in the dtype of ``scores``.
    """
    values = scores if scores.is_floating_point() else scores.float()
    last = last_token_mask(mask)
    return torch.where(last, values.unsqueeze(-1), torch.zeros((), dtype=values.dtype, device=values.device))


def detach_stats(stats: dict[str, Tensor]) -> Stats:
    """Detach every value of a stats dict (they stay on their device: no host sync)."""
    return {name: value.detach() for name, value in stats.items()}
