"""Supervised fine-tuning loss: masked next-token negative log-likelihood."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algorithms.aggregation import Count, aggregate, count_tokens
from rlhf.algorithms.entropy import logprobs_from_logits
from rlhf.algorithms.utils import Stats, detach_stats, masked_mean

IGNORE_INDEX = -100
"""Label id that marks a position without loss (prompt, padding), as in Hugging Face."""


def sft_loss(
    logprobs: Tensor,
    mask: Tensor,
    *,
    agg: str = "token_mean",
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    constant_normalizer: Count | None = None,
) -> tuple[Tensor, Stats]:
    """Negative log-likelihood of the target tokens.

    loss = aggregate(-logprobs, mask, agg)      ("token_mean" = the usual cross-entropy)

    Args:
        logprobs: ``[B, T]`` log p(target token t | tokens before it), e.g. from
            :func:`rlhf.algorithms.entropy.logprobs_from_logits` on already-shifted logits.
        mask: ``[B, T]`` positions that count (the targets; 0 for prompt and padding).
        agg: a ``LOSS_AGGREGATIONS`` mode; ``seq_mean_token_mean`` weights sequences equally.
        global_tokens: see :func:`rlhf.algorithms.aggregation.aggregate`.
        global_seqs: see ``aggregate``.
        constant_normalizer: see ``aggregate``.

    Returns:
        ``(loss, stats)`` with stats ``sft/loss``, ``sft/nll`` (token-mean NLL of this shard,
        whatever ``agg`` is) and ``sft/tokens`` (number of target tokens in this shard).
    """
    nll = -torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))
    loss = aggregate(
        nll,
        mask,
        agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        constant_normalizer=constant_normalizer,
    )
    stats = {"sft/loss": loss, "sft/nll": masked_mean(nll, mask), "sft/tokens": count_tokens(mask)}
    return loss, detach_stats(stats)


def sft_loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    agg: str = "token_mean",
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    constant_normalizer: Count | None = None,
) -> tuple[Tensor, Stats]:
    """:func:`sft_loss` from unshifted model outputs and Hugging Face style labels.

    The logits at position t predict the token at t + 1, so the loss pairs ``logits[:, :-1]`` with
    ``labels[:, 1:]``; labels equal to ``ignore_index`` give the mask (the labels are the mask).

    Args:
        logits: ``[B, T, V]`` model outputs for the full sequence.
        labels: ``[B, T]`` input ids, with ``ignore_index`` where no loss is wanted.
        ignore_index: label id without loss.
        agg: a ``LOSS_AGGREGATIONS`` mode.
        global_tokens: see :func:`rlhf.algorithms.aggregation.aggregate`; counts shifted targets.
        global_seqs: see ``aggregate``.
        constant_normalizer: see ``aggregate``.

    Returns:
        ``(loss, stats)`` as :func:`sft_loss`.
    """
    targets = labels[:, 1:]
    mask = targets != ignore_index
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    logprobs = logprobs_from_logits(logits[:, :-1], safe_targets)
    return sft_loss(
        logprobs,
        mask,
        agg=agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        constant_normalizer=constant_normalizer,
    )
