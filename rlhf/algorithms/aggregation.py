"""Turning a per-token loss matrix ``[B, R]`` into one scalar: the only place that divides by a count.

Data-parallel invariance: each rank holds a shard of the global batch. Pass the *global* counts
(``global_tokens`` = real tokens over all shards, ``global_seqs`` = sequences over all shards,
computed with :func:`count_tokens` / :func:`count_seqs` and all-reduced by the caller). Then every
mode divides by the global count instead of the local one, and the shard losses **sum** to the
loss of the full batch. An engine that *averages* gradients over ranks (DDP, DeepSpeed) must
scale the shard loss by the data-parallel world size to keep that sum; verl's ``agg_loss`` does
the same with its ``dp_size`` factor (verl 012be9d, ``verl/trainer/ppo/core_algos.py``).

Modes (registry ``LOSS_AGGREGATIONS``), with m the mask, N tokens and S sequences:

- ``token_mean``:            sum_ij m_ij l_ij / N           (DAPO's token-level loss, arXiv:2503.14476 §3.3)
- ``seq_mean_token_mean``:   (1/S) sum_i [sum_j m_ij l_ij / sum_j m_ij]     (GRPO, arXiv:2402.03300 eq. 3)
- ``seq_mean_token_sum``:    (1/S) sum_i sum_j m_ij l_ij
- ``seq_mean_token_sum_norm``: (1/S) sum_i sum_j m_ij l_ij / C, C a constant such as the maximum
  response length                                                           (Dr.GRPO, arXiv:2503.20783)

A "sequence" is a row with at least one real token, so fully masked rows count for nothing.
"""

from __future__ import annotations

from typing import Protocol, Union

import torch
from torch import Tensor

from rlhf.algorithms.registry import Registry
from rlhf.algorithms.utils import masked_sum
from rlhf.errors import ConfigError

Count = Union[int, float, Tensor]


class LossAggregation(Protocol):
    """Shared signature of every ``LOSS_AGGREGATIONS`` entry: ``[B, R]`` losses -> 0-d tensor."""

    def __call__(
        self,
        loss_mat: Tensor,
        mask: Tensor,
        *,
        global_tokens: Count | None = None,
        global_seqs: Count | None = None,
        constant_normalizer: Count | None = None,
    ) -> Tensor: ...


LOSS_AGGREGATIONS: Registry[LossAggregation] = Registry("loss aggregation")


def count_tokens(mask: Tensor) -> Tensor:
    """Number of real tokens in ``mask`` (0-d float tensor; all-reduce it for ``global_tokens``)."""
    return mask.bool().sum().to(torch.get_default_dtype())


def count_seqs(mask: Tensor) -> Tensor:
    """Number of rows with at least one real token (0-d float; all-reduce it for ``global_seqs``)."""
    return mask.bool().any(dim=-1).sum().to(torch.get_default_dtype())


def _per_seq_token_mean(loss_mat: Tensor, mask: Tensor) -> Tensor:
    tokens_per_seq = mask.bool().sum(dim=-1).clamp(min=1)
    return masked_sum(loss_mat, mask, dim=-1) / tokens_per_seq


def _divide(total: Tensor, count: Count) -> Tensor:
    # Clamp so that an empty shard gives 0 (and zero gradients) rather than NaN.
    if isinstance(count, Tensor):
        return total / count.to(total.dtype).clamp(min=1)
    return total / max(float(count), 1.0)


@LOSS_AGGREGATIONS.register("token_mean")
def _token_mean(loss_mat, mask, *, global_tokens=None, global_seqs=None, constant_normalizer=None):
    tokens = count_tokens(mask) if global_tokens is None else global_tokens
    return _divide(masked_sum(loss_mat, mask), tokens)


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def _seq_mean_token_mean(loss_mat, mask, *, global_tokens=None, global_seqs=None, constant_normalizer=None):
    seqs = count_seqs(mask) if global_seqs is None else global_seqs
    return _divide(_per_seq_token_mean(loss_mat, mask).sum(), seqs)


@LOSS_AGGREGATIONS.register("seq_mean_token_sum")
def _seq_mean_token_sum(loss_mat, mask, *, global_tokens=None, global_seqs=None, constant_normalizer=None):
    seqs = count_seqs(mask) if global_seqs is None else global_seqs
    return _divide(masked_sum(loss_mat, mask), seqs)


@LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(loss_mat, mask, *, global_tokens=None, global_seqs=None, constant_normalizer=None):
    if constant_normalizer is None:
        # No silent default: the padded width differs between shards, so it would break invariance.
        raise ConfigError(
            "loss aggregation 'seq_mean_token_sum_norm' needs constant_normalizer "
            "(Dr.GRPO uses the generation limit, e.g. max_new_tokens); pass it or pick another mode"
        )
    seqs = count_seqs(mask) if global_seqs is None else global_seqs
    return _divide(masked_sum(loss_mat, mask), seqs) / constant_normalizer


def aggregate(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    *,
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    constant_normalizer: Count | None = None,
) -> Tensor:
    """Reduce a per-token loss matrix to a 0-d loss with the named aggregation mode.

    Formulas are in the module docstring. With ``global_tokens`` / ``global_seqs`` given, the
    division uses those global counts instead of the local ones, so summing the result over
    data-parallel shards gives the full-batch loss.

    Args:
        loss_mat: ``[B, R]`` per-token losses; values at masked positions are ignored.
        mask: ``[B, R]`` real response tokens.
        mode: a ``LOSS_AGGREGATIONS`` name: ``token_mean``, ``seq_mean_token_mean``,
            ``seq_mean_token_sum``, ``seq_mean_token_sum_norm``.
        global_tokens: real tokens in the global batch (``token_mean``).
        global_seqs: sequences in the global batch (the ``seq_mean_*`` modes).
        constant_normalizer: the constant C of ``seq_mean_token_sum_norm`` (required there).

    Returns:
        0-d tensor.

    Raises:
        ConfigError: unknown ``mode``, or ``seq_mean_token_sum_norm`` without a normalizer.
    """
    return LOSS_AGGREGATIONS.get(mode)(
        loss_mat,
        mask,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        constant_normalizer=constant_normalizer,
    )
