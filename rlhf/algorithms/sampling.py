"""Dynamic sampling (DAPO): which sampled groups carry a learning signal, and which rows to train on.

A group is the ``n_samples_per_prompt`` responses to one prompt. When every response of a group
gets the same score, every group-relative advantage (GRPO, Dr.GRPO, RLOO, ...) is exactly 0, so
the group adds tokens to the loss's denominator but no gradient. DAPO (Yu et al. 2025,
arXiv:2503.14476 §3.2, eq. 11: ``0 < |{o_i : is_equivalent(a, o_i)}| < G``) drops such groups and
samples more prompts until the batch is full of informative ones.

The controller generates round after round; these pure functions decide what to keep.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCORE_TOLERANCE = 1e-6
"""Scores closer than this count as equal (rule rewards are exact; model scores are floats)."""


@torch.no_grad()
def informative_groups(scores: Tensor, group_ids: Tensor, *, tol: float = SCORE_TOLERANCE) -> Tensor:
    """Rows whose group's scores are not all equal (max - min > tol).

    Args:
        scores: ``[B]`` outcome score of each sequence.
        group_ids: ``[B]`` integer ids; equal ids = samples of the same prompt.
        tol: scores within ``tol`` of each other count as equal.

    Returns:
        ``[B]`` bool, True on every row of an informative group. A group of one is never
        informative (it has nothing to be compared with).
    """
    group_ids = torch.as_tensor(group_ids, device=scores.device)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    groups = int(inverse.max()) + 1 if len(inverse) else 0
    scores = scores.to(torch.float64)
    highest = torch.full((groups,), -torch.inf, dtype=scores.dtype).scatter_reduce(0, inverse, scores, "amax")
    lowest = torch.full((groups,), torch.inf, dtype=scores.dtype).scatter_reduce(0, inverse, scores, "amin")
    return (highest - lowest > tol)[inverse]


def select_groups(informative: Tensor, group_ids: Tensor, num_groups: int) -> tuple[Tensor, int]:
    """Row indices of exactly ``num_groups`` groups: informative ones first, then padding.

    Groups are taken in order of first appearance: the first ``num_groups`` informative groups;
    if there are fewer (the round limit was hit), the batch is padded with the earliest
    uninformative groups. Padding keeps the batch size fixed (the optimizer-step arithmetic of
    ``train_batch_size`` holds), and under a group-relative estimator those rows have advantage
    0, so they add no gradient; they only enlarge a token-mean denominator.

    Args:
        informative: ``[B]`` bool, as returned by :func:`informative_groups`.
        group_ids: ``[B]`` integer ids; equal ids = same prompt.
        num_groups: groups wanted (``rollout_batch_size``).

    Returns:
        ``(rows, padded)``: ``rows`` a ``[num_groups × group size]`` long tensor of row indices,
        group by group in the order taken, and ``padded`` the number of uninformative groups used.

    Raises:
        ValueError: fewer than ``num_groups`` groups in total (the caller generated too little).
    """
    order: dict[int, list[int]] = {}
    for row, group in enumerate(torch.as_tensor(group_ids).tolist()):
        order.setdefault(group, []).append(row)
    flags = informative.tolist()
    useful = [rows for rows in order.values() if flags[rows[0]]]
    useless = [rows for rows in order.values() if not flags[rows[0]]]
    if len(useful) + len(useless) < num_groups:
        raise ValueError(f"select_groups needs {num_groups} groups, got {len(useful) + len(useless)}")
    chosen = useful[:num_groups]
    padded = num_groups - len(chosen)
    chosen += useless[:padded]
    return torch.tensor([row for rows in chosen for row in rows], dtype=torch.long), padded
