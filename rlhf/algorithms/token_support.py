"""Teacher token distributions on a top-k support with a tail bucket: what a teacher ships to a student.

A full ``[B, R, V]`` teacher distribution is too large to move between actors when V is ~150k, so
the teacher ships, per response position, the log-probabilities of its ``k`` most likely tokens
plus one **tail bucket**, the log of the mass of every other token:

    teacher support  [log T(v_1), ..., log T(v_k), log(1 - sum_i T(v_i))]       ([B, R, k + 1])
    student support  [log S(v_1), ..., log S(v_k), log(1 - sum_i S(v_i))]       (same k tokens)

Both are proper distributions over the same k + 1 outcomes, so every ``DISTILLATION_LOSSES``
entry applies unchanged (already-normalised log-probabilities are their own log_softmax; call it
with ``temperature=1``: the temperature was applied before the top-k here).

Approximation: merging outcomes never increases an f-divergence (data-processing inequality), so
forward KL, reverse KL and the generalised JSD on this support are lower bounds of the
full-vocabulary values, exact when the tail carries no mass (or ``top_k`` covers the vocabulary).
The student learns the teacher's top-k probabilities and its total tail mass, not the shape inside
the tail. With ``top_k = 0`` or ``top_k >= V`` the full distribution ships (no tail column) and the
losses are the exact full-vocabulary ones.

Tail log-masses are clamped at ``LOG_FLOOR`` so that a tail of (numerically) zero mass stays finite
(``0 · log 0`` would be NaN in the KL sums); exp(LOG_FLOOR) is 0 in float32, so the clamp only
removes the NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.errors import ConfigError

LOG_FLOOR = -1e4


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def _tail(logprobs: Tensor, token_ids: Tensor) -> Tensor:
    """log of the mass outside `token_ids` ([B, R]), from the complement's logsumexp (no 1 - x cancellation)."""
    rest = logprobs.scatter(-1, token_ids, float("-inf"))
    return torch.logsumexp(rest, dim=-1).clamp(min=LOG_FLOOR)


def uses_full_vocab(top_k: int, vocab_size: int) -> bool:
    """True when the whole distribution ships (top_k 0 or at least the vocabulary size)."""
    return top_k <= 0 or top_k >= vocab_size


def teacher_support(logits: Tensor, *, top_k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """The teacher's distribution on its top-k support plus tail bucket.

    Args:
        logits: ``[B, R, V]`` teacher logits of the response positions.
        top_k: tokens kept per position; 0 or >= V ships the full distribution.
        temperature: softmax temperature (> 0), applied before the top-k.

    Returns:
        ``(support_logprobs, token_ids)``: ``[B, R, k + 1]`` log-probabilities (last column the tail)
        and ``[B, R, k]`` token ids; or ``[B, R, V]`` and None for the full distribution.
    """
    logprobs = _log_softmax(logits, temperature)
    if uses_full_vocab(top_k, logprobs.shape[-1]):
        return logprobs, None
    top, token_ids = torch.topk(logprobs, top_k, dim=-1)
    return torch.cat([top, _tail(logprobs, token_ids).unsqueeze(-1)], dim=-1), token_ids


def student_support(logits: Tensor, token_ids: Tensor | None, *, temperature: float = 1.0) -> Tensor:
    """The student's distribution on the teacher's support (differentiable).

    Args:
        logits: ``[B, R, V]`` student logits of the response positions.
        token_ids: ``[B, R, k]`` the teacher's support, or None for the full distribution.
        temperature: the same temperature the teacher used (> 0).

    Returns:
        ``[B, R, k + 1]`` log-probabilities (last column the tail), or ``[B, R, V]`` when
        ``token_ids`` is None.
    """
    logprobs = _log_softmax(logits, temperature)
    if token_ids is None:
        return logprobs
    token_ids = token_ids.to(device=logprobs.device, dtype=torch.long)
    top = torch.gather(logprobs, -1, token_ids)
    return torch.cat([top, _tail(logprobs, token_ids).unsqueeze(-1)], dim=-1)
