"""Advantage estimators: per-token advantages and returns from rewards (and values).

Every entry of ``ADVANTAGE_ESTIMATORS`` has the signature of :class:`AdvantageEstimator`:
keyword-only, all inputs named, those an estimator does not read may be ``None``. The controller
always calls ``ADVANTAGE_ESTIMATORS.get(name)(**inputs)``; no estimator is special-cased.

Inputs (B sequences, R response tokens; see ``rlhf.algorithms`` for the alignment):

- ``token_rewards`` ``[B, R]``: per-token rewards, normally from
  :func:`rlhf.algorithms.kl.kl_in_reward` (``-kl_coef * kl`` on every token plus the outcome
  score on the last real token). Where an estimator needs it and it is ``None``, it is built from
  ``scores`` alone (score on the last real token, no KL).
- ``scores`` ``[B]``: outcome score of each sequence.
- ``values`` ``[B, R]``: critic values V(prefix up to token j); only ``gae`` reads them.
- ``mask`` ``[B, R]``: real response tokens.
- ``group_ids`` ``[B]`` integer tensor: sequences with equal ids are samples of the same prompt.
  Any integers will do; they are remapped with ``torch.unique``.

Every estimator returns ``(advantages [B, R], returns [B, R])``, both zero at masked positions
and computed without gradient.

Which estimator reads what:

====================== ================================== ==========================================
name                   reads                              ``norm_by_std`` means
====================== ================================== ==========================================
gae                    token_rewards|scores, values,      whiten advantages over the batch
                       gamma, lam
grpo                   scores, group_ids, eps             divide by the group std (+ eps)
dr_grpo                scores, group_ids                  ignored: never divides (Dr.GRPO)
rloo                   scores, group_ids                  ignored
reinforce_pp           token_rewards|scores, gamma        whiten returns over the batch (else centre)
reinforce_pp_baseline  token_rewards|scores, scores,      whiten over the batch (else centre)
                       group_ids, gamma
====================== ================================== ==========================================
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from rlhf.algorithms.registry import Registry
from rlhf.algorithms.utils import masked_mean, masked_whiten, scatter_to_last_token
from rlhf.errors import ConfigError


class AdvantageEstimator(Protocol):
    """Shared signature of every ``ADVANTAGE_ESTIMATORS`` entry."""

    def __call__(
        self,
        *,
        token_rewards: Tensor | None = None,
        scores: Tensor | None = None,
        values: Tensor | None = None,
        mask: Tensor,
        group_ids: Tensor | None = None,
        gamma: float = 1.0,
        lam: float = 0.95,
        norm_by_std: bool = True,
        eps: float = 1e-6,
    ) -> tuple[Tensor, Tensor]: ...


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _zero_masked(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def _group_statistics(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sequence (group mean, group unbiased std, group size), each ``[B]`` float64.

    Each group is shifted by its own lowest score and summed in float64 (the shifted-data
    algorithm for the variance). A group of equal scores then has a mean equal to its score and
    a std of exactly 0, whatever the magnitude or the group size; callers take ``score - mean``
    in float64 too, so a constant group's deviation is exactly 0. (Without the shift a float32
    mean is an ulp off, the std is an ulp, and GRPO's division turns rounding into an advantage of
    ±0.05..0.9.) A group of one has mean = its score and std 0.
    """
    group_ids = torch.as_tensor(group_ids, device=scores.device)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    wide = scores.to(torch.float64)
    lowest = torch.full(counts.shape, torch.inf, dtype=torch.float64, device=scores.device)
    lowest = lowest.scatter_reduce(0, inverse, wide, "amin")
    shifted = wide - lowest[inverse]
    sizes = counts.to(torch.float64)
    shifted_means = torch.zeros_like(sizes).index_add_(0, inverse, shifted) / sizes
    deviations = shifted - shifted_means[inverse]
    sq_sums = torch.zeros_like(sizes).index_add_(0, inverse, deviations**2)
    stds = (sq_sums / (sizes - 1).clamp(min=1)).sqrt()
    means = lowest + shifted_means
    return means[inverse], stds[inverse], sizes[inverse]


def _float_scores(scores: Tensor) -> Tensor:
    return scores if scores.is_floating_point() else scores.to(torch.get_default_dtype())


def _normalise_over_batch(values: Tensor, mask: Tensor, norm_by_std: bool) -> Tensor:
    if norm_by_std:
        return masked_whiten(values, mask)
    return _zero_masked(values - masked_mean(values, mask), mask)


@torch.no_grad()
def compute_discounted_returns(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """Discounted reward-to-go of every real token.

    G_j = r_j + gamma * G_{j+1}, taken over real tokens only: a masked position neither adds a
    reward nor breaks the chain (so holes, e.g. tool outputs in multi-turn data, are skipped).

    Args:
        token_rewards: ``[B, R]`` per-token rewards.
        mask: ``[B, R]`` real response tokens.
        gamma: discount factor.

    Returns:
        ``[B, R]`` returns, 0 at masked positions.
    """
    real = mask.bool()
    rewards = _zero_masked(token_rewards, mask)
    running = torch.zeros_like(rewards[:, 0])
    returns = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[-1])):
        running = torch.where(real[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return _zero_masked(returns, mask)


@torch.no_grad()
def compute_gae_advantages(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over response tokens.

    delta_j = r_j + gamma * V_{j+1} - V_j         (V after the last real token is 0)
    A_j     = delta_j + gamma * lam * A_{j+1}
    returns = A + V                               (targets for the value loss)

    Schulman et al. 2015, arXiv:1506.02438 eq. 16. With gamma = lam = 1, A_j = sum_{k>=j} r_k - V_j,
    i.e. returns are the suffix sums of the rewards. Masked positions are skipped, as in verl
    ``compute_gae_advantage_return`` (verl 012be9d, ``verl/trainer/ppo/core_algos.py``); RLHF
    defaults gamma = 1, lam = 0.95 follow OpenRLHF.

    Args:
        token_rewards: ``[B, R]`` per-token rewards (KL penalty + score on the last token).
        values: ``[B, R]`` critic values of the old policy.
        mask: ``[B, R]`` real response tokens.
        gamma: discount factor.
        lam: GAE lambda.
        whiten: whiten the advantages over the batch (the returns are left as they are).

    Returns:
        ``(advantages [B, R], returns [B, R])``, 0 at masked positions.
    """
    real = mask.bool()
    rewards = _zero_masked(token_rewards, mask)
    values = _zero_masked(values, mask)
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(real[:, t], delta + gamma * lam * running, running)
        next_value = torch.where(real[:, t], values[:, t], next_value)
        advantages[:, t] = running
    advantages = _zero_masked(advantages, mask)
    returns = _zero_masked(advantages + values, mask)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


@torch.no_grad()
def compute_grpo_advantages(
    scores: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO outcome advantages: the score normalised within its group, on every real token.

    A_i = (s_i - mean_group(s)) / (std_group(s) + eps)     (norm_by_std=True, GRPO)
    A_i =  s_i - mean_group(s)                             (norm_by_std=False, Dr.GRPO)

    GRPO: arXiv:2402.03300 §4.1.2 (outcome supervision); Dr.GRPO drops the std:
    arXiv:2503.20783 §3.2. std is the unbiased group std and eps = 1e-6, as in verl
    ``compute_grpo_outcome_advantage`` (verl 012be9d). A group of one gets advantage 0 (it has no
    relative signal; verl instead uses mean 0 / std 1 there). Returns equal the advantages.

    Args:
        scores: ``[B]`` outcome scores.
        mask: ``[B, R]`` real response tokens.
        group_ids: ``[B]`` integer ids; equal ids = same prompt.
        norm_by_std: divide by the group std.
        eps: added to the std.

    Returns:
        ``(advantages [B, R], returns [B, R])``: A_i on each real token of row i, 0 elsewhere.
    """
    scores = _float_scores(scores)
    means, stds, _ = _group_statistics(scores, group_ids)
    advantages = scores.to(torch.float64) - means
    if norm_by_std:
        advantages = advantages / (stds + eps)
    advantages = _zero_masked(advantages.to(scores.dtype).unsqueeze(-1).expand(mask.shape), mask)
    return advantages, advantages


@torch.no_grad()
def compute_rloo_advantages(scores: Tensor, mask: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """REINFORCE Leave-One-Out: baseline = mean score of the *other* samples of the prompt.

    A_i = s_i - (1/(n-1)) sum_{j != i} s_j = n/(n-1) * (s_i - mean_group(s))

    Ahmadian et al. 2024, arXiv:2402.14740 (the RLOO estimator of Kool et al. 2019). A group of one (n = 1) gets
    advantage 0. Returns equal the advantages.

    Args:
        scores: ``[B]`` outcome scores.
        mask: ``[B, R]`` real response tokens.
        group_ids: ``[B]`` integer ids; equal ids = same prompt.

    Returns:
        ``(advantages [B, R], returns [B, R])``.
    """
    scores = _float_scores(scores)
    means, _, sizes = _group_statistics(scores, group_ids)
    advantages = (scores.to(torch.float64) - means) * sizes / (sizes - 1).clamp(min=1)
    advantages = _zero_masked(advantages.to(scores.dtype).unsqueeze(-1).expand(mask.shape), mask)
    return advantages, advantages


@torch.no_grad()
def compute_reinforce_pp_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    norm_by_std: bool = True,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: discounted token returns, normalised over the whole batch.

    G_j = sum_{k>=j} gamma^(k-j) r_k,   A = (G - mean_batch(G)) / std_batch(G)

    Hu 2025, arXiv:2501.03262 (token-level KL penalty in the reward, global advantage
    normalisation). ``token_rewards`` already carry the KL penalty (see ``kl_in_reward``).

    Args:
        token_rewards: ``[B, R]`` per-token rewards.
        mask: ``[B, R]`` real response tokens.
        gamma: discount factor.
        norm_by_std: whiten (True) or only subtract the batch mean (False).

    Returns:
        ``(advantages [B, R], returns [B, R])``; returns are the un-normalised G.
    """
    returns = compute_discounted_returns(token_rewards, mask, gamma=gamma)
    return _normalise_over_batch(returns, mask, norm_by_std), returns


@torch.no_grad()
def compute_reinforce_pp_baseline_advantages(
    token_rewards: Tensor | None,
    scores: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    *,
    gamma: float = 1.0,
    norm_by_std: bool = True,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline: subtract the group-mean score, then REINFORCE++.

    r'_j = r_j - [j is the last real token] * mean_group(s);  G from r';  A = whiten(G)

    arXiv:2501.03262 (REINFORCE++-baseline); OpenRLHF subtracts the group mean from the score
    before adding the KL penalty, verl ``compute_reinforce_plus_plus_baseline_outcome_advantage``
    then whitens (verl 012be9d). A group of one is its own baseline, so only the KL part of its
    rewards remains.

    Args:
        token_rewards: ``[B, R]`` per-token rewards holding ``scores`` on the last real token
            (as ``kl_in_reward`` builds them), or ``None`` to use the scores alone.
        scores: ``[B]`` outcome scores.
        mask: ``[B, R]`` real response tokens.
        group_ids: ``[B]`` integer ids; equal ids = same prompt.
        gamma: discount factor.
        norm_by_std: whiten (True) or only subtract the batch mean (False).

    Returns:
        ``(advantages [B, R], returns [B, R])``; returns are G of the baselined rewards.
    """
    scores = _float_scores(scores)
    if token_rewards is None:
        token_rewards = scatter_to_last_token(scores, mask)
    means, _, _ = _group_statistics(scores, group_ids)
    baselined = token_rewards - scatter_to_last_token(means.to(token_rewards.dtype), mask)
    returns = compute_discounted_returns(baselined, mask, gamma=gamma)
    return _normalise_over_batch(returns, mask, norm_by_std), returns


# ----------------------------------------------------------------------------------------------
# Registry entries: one adapter per name, all with the AdvantageEstimator signature.
# ----------------------------------------------------------------------------------------------


def _require(estimator: str, **inputs: Tensor | None) -> None:
    missing = [name for name, value in inputs.items() if value is None]
    if missing:
        raise ConfigError(
            f"advantage estimator {estimator!r} needs {', '.join(missing)}; "
            "provide it (values come from a critic, group_ids from n_samples_per_prompt > 1) "
            f"or pick another estimator from {ADVANTAGE_ESTIMATORS.names()}"
        )


def _rewards_or_scores(estimator: str, token_rewards: Tensor | None, scores: Tensor | None, mask: Tensor) -> Tensor:
    if token_rewards is not None:
        return token_rewards
    if scores is None:
        raise ConfigError(f"advantage estimator {estimator!r} needs token_rewards or scores; got neither")
    return scatter_to_last_token(scores, mask)


# Each entry names only the inputs it reads; the rest of the AdvantageEstimator signature lands in
# `_unused`, so the controller can pass every input to every estimator.


@ADVANTAGE_ESTIMATORS.register("gae")
def _gae(*, token_rewards=None, scores=None, values=None, mask, gamma=1.0, lam=0.95, norm_by_std=True, **_unused):
    rewards = _rewards_or_scores("gae", token_rewards, scores, mask)
    _require("gae", values=values)
    return compute_gae_advantages(rewards, values, mask, gamma=gamma, lam=lam, whiten=norm_by_std)


@ADVANTAGE_ESTIMATORS.register("grpo")
def _grpo(*, scores=None, mask, group_ids=None, norm_by_std=True, eps=1e-6, **_unused):
    _require("grpo", scores=scores, group_ids=group_ids)
    return compute_grpo_advantages(scores, mask, group_ids, norm_by_std=norm_by_std, eps=eps)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def _dr_grpo(*, scores=None, mask, group_ids=None, eps=1e-6, **_unused):
    _require("dr_grpo", scores=scores, group_ids=group_ids)
    return compute_grpo_advantages(scores, mask, group_ids, norm_by_std=False, eps=eps)


@ADVANTAGE_ESTIMATORS.register("rloo")
def _rloo(*, scores=None, mask, group_ids=None, **_unused):
    _require("rloo", scores=scores, group_ids=group_ids)
    return compute_rloo_advantages(scores, mask, group_ids)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def _reinforce_pp(*, token_rewards=None, scores=None, mask, gamma=1.0, norm_by_std=True, **_unused):
    rewards = _rewards_or_scores("reinforce_pp", token_rewards, scores, mask)
    return compute_reinforce_pp_advantages(rewards, mask, gamma=gamma, norm_by_std=norm_by_std)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline")
def _reinforce_pp_baseline(
    *, token_rewards=None, scores=None, mask, group_ids=None, gamma=1.0, norm_by_std=True, **_unused
):
    _require("reinforce_pp_baseline", scores=scores, group_ids=group_ids)
    return compute_reinforce_pp_baseline_advantages(
        token_rewards, scores, mask, group_ids, gamma=gamma, norm_by_std=norm_by_std
    )
