"""Log-probabilities and entropies from logits, computed stably and without a full softmax copy.

Both functions upcast to float32 one chunk of rows at a time, so bf16 logits ``[B, T, V]`` never
need a float32 copy of the whole tensor (TRL's ``selective_log_softmax`` uses the same idea).
"""

from __future__ import annotations

import torch
from torch import Tensor

ROWS_PER_CHUNK = 1024
"""Rows (token positions) upcast to float32 at once for low-precision logits."""


def _rows(logits: Tensor) -> Tensor:
    return logits.reshape(-1, logits.shape[-1])


def _needs_upcast(logits: Tensor) -> bool:
    return logits.dtype in (torch.float16, torch.bfloat16)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under the softmax of its logits.

    logprob = logits[label] - logsumexp(logits)   (never materialises log_softmax over V)

    Args:
        logits: ``[..., V]`` logits, e.g. ``[B, R, V]`` already aligned with the labels (logits
            at position t predict labels at position t).
        labels: ``[...]`` token ids; must be valid indices (replace ignore ids such as -100 first).

    Returns:
        ``[...]`` float32 (or float64 for float64 logits) log-probabilities.
    """
    flat_logits, flat_labels = _rows(logits), labels.reshape(-1)
    if not _needs_upcast(logits):
        picked = flat_logits.gather(-1, flat_labels.unsqueeze(-1)).squeeze(-1)
        return (picked - torch.logsumexp(flat_logits, dim=-1)).reshape(labels.shape)
    chunks = []
    for start in range(0, flat_logits.shape[0], ROWS_PER_CHUNK):
        chunk = flat_logits[start : start + ROWS_PER_CHUNK].float()
        ids = flat_labels[start : start + ROWS_PER_CHUNK].unsqueeze(-1)
        chunks.append(chunk.gather(-1, ids).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
    return torch.cat(chunks).reshape(labels.shape)


def _entropy_rows(logits: Tensor) -> Tensor:
    log_normaliser = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return log_normaliser - (probs * logits).sum(dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution softmax(logits), per position.

    H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v      (p = softmax(z); no log of 0)

    Args:
        logits: ``[..., V]`` logits, e.g. ``[B, R, V]``.

    Returns:
        ``[...]`` entropies in nats (float32 for low-precision logits).
    """
    if not _needs_upcast(logits):
        return _entropy_rows(logits)
    flat = _rows(logits)
    chunks = [
        _entropy_rows(flat[start : start + ROWS_PER_CHUNK].float())
        for start in range(0, flat.shape[0], ROWS_PER_CHUNK)
    ]
    return torch.cat(chunks).reshape(logits.shape[:-1])
