"""Log-probabilities and entropies from logits, computed stably and without a full softmax copy.

Full-precision logits are reduced in place (no ``log_softmax`` tensor of size V is kept). Low
precision (bf16/fp16) logits are upcast to float32 one chunk of at most ``ROWS_PER_CHUNK``
positions at a time, so ``[B, T, V]`` logits never get a float32 copy of the whole tensor (TRL's
``selective_log_softmax`` uses the same idea). Slicing such as ``logits[:, :-1]`` is fine: nothing
is reshaped, so a non-contiguous view is not copied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ROWS_PER_CHUNK = 1024
"""Positions upcast to float32 at once for low-precision logits."""


def _needs_upcast(logits: Tensor) -> bool:
    return logits.dtype in (torch.float16, torch.bfloat16)


def _in_float32_chunks(fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor, labels: Tensor) -> Tensor:
    """Apply ``fn(float32 logits [n, V], labels [n])`` over chunks of positions; returns ``labels.shape``."""
    if logits.dim() > 2:
        return torch.stack([_in_float32_chunks(fn, lg, lb) for lg, lb in zip(logits, labels)])
    chunks = [
        fn(logits[start : start + ROWS_PER_CHUNK].float(), labels[start : start + ROWS_PER_CHUNK])
        for start in range(0, logits.shape[0], ROWS_PER_CHUNK)
    ]
    return torch.cat(chunks)


def _selected_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _entropy(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    log_normaliser = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    # A -inf logit (masked vocabulary entry) has p = 0; zero it so 0 * -inf cannot make NaN.
    finite_logits = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))
    return log_normaliser - (probs * finite_logits).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under the softmax of its logits.

    logprob = logits[label] - logsumexp(logits)   (never materialises log_softmax over V)

    Args:
        logits: ``[..., V]`` logits, e.g. ``[B, R, V]`` already aligned with the labels (logits
            at position t predict labels at position t).
        labels: ``[...]`` token ids; must be valid indices (replace ignore ids such as -100 first).

    Returns:
        ``[...]`` log-probabilities, float32 for low-precision logits, else in the logits' dtype.
    """
    if not _needs_upcast(logits):
        return _selected_logprobs(logits, labels)
    if logits.dim() == 1:
        return _selected_logprobs(logits.float(), labels)
    return _in_float32_chunks(_selected_logprobs, logits, labels)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution softmax(logits), per position.

    H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v      (p = softmax(z); no log of 0)

    Entries with logit -inf (masked vocabulary) count as probability 0.

    Args:
        logits: ``[..., V]`` logits, e.g. ``[B, R, V]``.

    Returns:
        ``[...]`` entropies in nats (float32 for low-precision logits).
    """
    if not _needs_upcast(logits):
        return _entropy(logits)
    if logits.dim() == 1:
        return _entropy(logits.float())
    positions = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return _in_float32_chunks(_entropy, logits, positions)
