"""Offline preference losses: DPO family (registry), SimPO, ORPO, KTO and the reward-model loss.

Inputs are per-sequence ``[B]`` tensors. Unless a name says ``_avg``, a sequence log-probability is
the **sum** over the real response tokens, sum_j mask_j * logprobs_j
(:func:`rlhf.algorithms.utils.sequence_logprobs`); ``_avg`` inputs are that sum divided by the
response length (``sequence_logprobs(..., average=True)``). Each loss is the mean over the pairs
(or samples) of the batch it is given.

``PREFERENCE_LOSSES`` holds the reference-based pairwise variants that ``dpo_loss`` selects with
``loss_type``; they share :class:`PreferenceLoss`. Write h for the implicit reward margin

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)

and every DPO-family stat uses the implicit rewards r = beta * (policy - ref).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.algorithms.registry import Registry
from rlhf.algorithms.utils import Stats, detach_stats, masked_mean
from rlhf.errors import ConfigError


class PreferenceLoss(Protocol):
    """Shared signature of every ``PREFERENCE_LOSSES`` entry."""

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
        *,
        beta: float = ...,
        label_smoothing: float = ...,
    ) -> tuple[Tensor, Stats]: ...


PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss")


def _pair_stats(prefix: str, loss: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> Stats:
    stats = {
        f"{prefix}/loss": loss,
        f"{prefix}/chosen_reward": chosen_rewards.mean(),
        f"{prefix}/rejected_reward": rejected_rewards.mean(),
        f"{prefix}/reward_accuracy": (chosen_rewards > rejected_rewards).to(loss.dtype).mean(),
        f"{prefix}/margin": (chosen_rewards - rejected_rewards).mean(),
    }
    return detach_stats(stats)


def _dpo_stats(
    loss: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Stats:
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    return _pair_stats("dpo", loss, chosen_rewards, rejected_rewards)


def _margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> Tensor:
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def _no_label_smoothing(loss_type: str, label_smoothing: float) -> None:
    if label_smoothing != 0.0:
        raise ConfigError(
            f"label_smoothing={label_smoothing} only applies to dpo loss_type 'sigmoid' (cDPO), "
            f"not {loss_type!r}; set it to 0"
        )


def _margin_loss(name: str, per_pair: Callable[[Tensor, float, float], Tensor]) -> PreferenceLoss:
    """A full ``PreferenceLoss`` from a per-pair loss of the margin h, beta and label smoothing.

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)). Every DPO-family entry shares
    the margin in front and the mean plus ``dpo/*`` stats behind, so each holds only its formula.
    The stats are ``dpo/loss``, ``dpo/chosen_reward``, ``dpo/rejected_reward`` (batch means of
    beta * (policy - ref)), ``dpo/reward_accuracy`` (fraction with chosen reward > rejected) and
    ``dpo/margin`` (mean chosen - rejected reward).
    """

    def loss_fn(
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
    ) -> tuple[Tensor, Stats]:
        h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        loss = per_pair(h, beta, label_smoothing).mean()
        return loss, _dpo_stats(
            loss, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
        )

    loss_fn.__name__ = loss_fn.__qualname__ = f"dpo_{name}_loss"
    loss_fn.__doc__ = per_pair.__doc__
    return PREFERENCE_LOSSES.register(name)(loss_fn)


def _sigmoid(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """DPO, optionally conservative (cDPO) with label smoothing eps (0 <= eps < 0.5).

    loss = mean( -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h) )

    DPO: Rafailov et al. 2023, arXiv:2305.18290 eq. 7 (eps = 0). cDPO: Mitchell 2023, "A note on
    DPO with noisy preferences", eq. 3 (as cited by OpenRLHF 09f5ace ``DPOLoss``). With policy ==
    reference, h = 0 and loss = log 2. Inputs are ``[B]`` summed log-probabilities.
    """
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def _ipo(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """IPO: regress the margin onto 1 / (2 tau) instead of pushing it to infinity.

    loss = mean( (h - 1 / (2 * beta))^2 )        (beta plays the paper's tau, > 0)

    Azar et al. 2023, arXiv:2310.12036 eq. 17. TRL feeds IPO length-averaged log-probabilities;
    here the caller decides by what it passes (sums by default, see the module docstring).
    label_smoothing must be 0.
    """
    _no_label_smoothing("ipo", label_smoothing)
    return (h - 1.0 / (2.0 * beta)) ** 2


def _hinge(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Hinge loss on the DPO margin (SLiC-style).

    loss = mean( relu(1 - beta * h) )        (1 / beta is the margin the hinge asks for)

    SLiC-HF: Zhao et al. 2023, arXiv:2305.10425 (calibration hinge loss), in the reference-based
    form of TRL's ``loss_type="hinge"``. label_smoothing must be 0.
    """
    _no_label_smoothing("hinge", label_smoothing)
    return torch.relu(1.0 - beta * h)


dpo_sigmoid_loss = _margin_loss("sigmoid", _sigmoid)
ipo_loss = _margin_loss("ipo", _ipo)
dpo_hinge_loss = _margin_loss("hinge", _hinge)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Stats]:
    """DPO-family loss, the variant looked up by ``loss_type`` in ``PREFERENCE_LOSSES``.

    ``sigmoid`` (DPO / cDPO, arXiv:2305.18290 eq. 7), ``ipo`` (arXiv:2310.12036 eq. 17),
    ``hinge`` (arXiv:2305.10425); formulas in each entry's docstring.

    Args:
        policy_chosen_logps: ``[B]`` summed log-probabilities of the chosen responses.
        policy_rejected_logps: ``[B]`` summed log-probabilities of the rejected responses.
        ref_chosen_logps: ``[B]`` the same under the frozen reference model.
        ref_rejected_logps: ``[B]``.
        beta: inverse temperature (tau for ``ipo``).
        loss_type: a ``PREFERENCE_LOSSES`` name.
        label_smoothing: cDPO flip probability (``sigmoid`` only).

    Returns:
        ``(loss, stats)`` with stats ``dpo/loss``, ``dpo/chosen_reward``, ``dpo/rejected_reward``,
        ``dpo/reward_accuracy``, ``dpo/margin``.

    Raises:
        ConfigError: unknown ``loss_type``, or label smoothing with a variant that has none.
    """
    return PREFERENCE_LOSSES.get(loss_type)(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
    )


def simpo_loss(
    chosen_logps_avg: Tensor,
    rejected_logps_avg: Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
) -> tuple[Tensor, Stats]:
    """SimPO: reference-free DPO on length-normalised log-probabilities with a target margin.

    loss = mean( -log sigmoid(beta * (chosen_avg - rejected_avg) - gamma) ),  gamma = beta * gamma_beta_ratio

    Meng et al. 2024, arXiv:2405.14734 eq. 6. Parametrised by gamma / beta as the authors' code
    (princeton-nlp/SimPO, ``gamma_beta_ratio``). TRL's CPOTrainer (loss_type="simpo") takes the
    margin itself: its ``simpo_gamma`` is gamma = ``beta * gamma_beta_ratio`` (TRL subtracts
    simpo_gamma / beta from the log-ratio difference before scaling by beta); e.g. beta 2.0 with
    gamma_beta_ratio 0.5 is simpo_gamma 1.0.

    Args:
        chosen_logps_avg: ``[B]`` mean per-token log-probability of the chosen responses.
        rejected_logps_avg: ``[B]`` the same for the rejected responses.
        beta: reward scale.
        gamma_beta_ratio: target margin gamma divided by beta (TRL's ``simpo_gamma / beta``).

    Returns:
        ``(loss, stats)`` with stats ``simpo/loss``, ``simpo/chosen_reward``,
        ``simpo/rejected_reward`` (means of beta * avg logp), ``simpo/reward_accuracy``,
        ``simpo/margin``.
    """
    chosen_rewards = beta * chosen_logps_avg
    rejected_rewards = beta * rejected_logps_avg
    gamma = beta * gamma_beta_ratio
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    return loss, _pair_stats("simpo", loss, chosen_rewards, rejected_rewards)


ORPO_MAX_LOGP = -1e-7
"""Average log-probabilities are clamped below 0 so log(1 - p) stays finite."""


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012) and NaN-free under autograd."""
    x = x.clamp(max=ORPO_MAX_LOGP)
    near_zero = x > -math.log(2.0)
    # Each branch only ever sees inputs where it is finite, so the unused one cannot make 0 * inf.
    small = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    large = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, small, large)


def orpo_loss(
    chosen_logps_avg: Tensor,
    rejected_logps_avg: Tensor,
    chosen_nll: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, Stats]:
    """ORPO: SFT on the chosen response plus a log-odds-ratio preference term, no reference.

    log_odds(p)  = log p - log(1 - p)       with log p the average per-token log-probability
    L_OR         = -log sigmoid(log_odds(chosen) - log_odds(rejected))
    loss         = mean(chosen_nll) + beta * mean(L_OR)

    Hong et al. 2024, arXiv:2403.07691 eq. 6-7 (beta is the paper's lambda, 0.1 as in TRL).
    log(1 - p) is computed as log1mexp(log p), stable when p is near 0 or 1.

    Args:
        chosen_logps_avg: ``[B]`` mean per-token log-probability of the chosen responses.
        rejected_logps_avg: ``[B]`` the same for the rejected responses.
        chosen_nll: ``[B]`` (or 0-d) SFT negative log-likelihood of the chosen responses.
        beta: weight of the odds-ratio term.

    Returns:
        ``(loss, stats)`` with stats ``orpo/loss``, ``orpo/nll`` (mean chosen NLL),
        ``orpo/or_loss`` (mean L_OR), ``orpo/log_odds_ratio`` (mean) and
        ``orpo/reward_accuracy`` (fraction with chosen avg logp > rejected avg logp).
    """
    log_odds_ratio = (chosen_logps_avg - _log1mexp(chosen_logps_avg)) - (
        rejected_logps_avg - _log1mexp(rejected_logps_avg)
    )
    or_loss = -F.logsigmoid(log_odds_ratio).mean()
    nll = chosen_nll.mean()
    loss = nll + beta * or_loss
    stats = {
        "orpo/loss": loss,
        "orpo/nll": nll,
        "orpo/or_loss": or_loss,
        "orpo/log_odds_ratio": log_odds_ratio.mean(),
        "orpo/reward_accuracy": (chosen_logps_avg > rejected_logps_avg).to(loss.dtype).mean(),
    }
    return loss, detach_stats(stats)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    is_desirable: Tensor,
    kl_reference: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Stats]:
    """KTO: a prospect-theory loss on unpaired desirable / undesirable examples.

    r    = policy_logps - ref_logps
    z0   = max(mean(kl_reference), 0), detached
    l    = desirable_weight   * (1 - sigmoid(beta * (r - z0)))     for desirable examples
    l    = undesirable_weight * (1 - sigmoid(beta * (z0 - r)))     for undesirable examples
    loss = mean(l)

    Ethayarajh et al. 2024, arXiv:2402.01306 (the KTO loss, L = E[lambda_y - v(x, y)]); as in
    TRL / OpenRLHF 09f5ace ``KTOLoss``, z0 is estimated from mismatched (prompt, completion)
    pairs, carries no gradient and is clamped at 0.

    Args:
        policy_logps: ``[B]`` summed log-probabilities of the completions under the policy.
        ref_logps: ``[B]`` the same under the reference model.
        is_desirable: ``[B]`` bool, True for desirable examples.
        kl_reference: 0-d estimate of KL(policy || ref), or ``[K]`` per-sample log-ratios
            policy_logps - ref_logps of mismatched pairs (averaged here). Data-parallel callers
            all-reduce it first.
        beta: inverse temperature.
        desirable_weight: lambda_D.
        undesirable_weight: lambda_U.

    Returns:
        ``(loss, stats)`` with stats ``kto/loss``, ``kto/kl`` (z0), ``kto/chosen_reward`` and
        ``kto/rejected_reward`` (mean beta * r over desirable / undesirable examples; 0 if none).
    """
    desirable = is_desirable.bool()
    z0 = kl_reference.detach().mean().clamp(min=0)
    log_ratio = policy_logps - ref_logps
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (log_ratio - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - log_ratio)))
    loss = torch.where(desirable, desirable_losses, undesirable_losses).mean()
    rewards = beta * log_ratio
    stats = {
        "kto/loss": loss,
        "kto/kl": z0,
        "kto/chosen_reward": masked_mean(rewards, desirable),
        "kto/rejected_reward": masked_mean(rewards, ~desirable),
    }
    return loss, detach_stats(stats)


def pairwise_reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | float | None = None,
) -> tuple[Tensor, Stats]:
    """Bradley-Terry reward-model loss, optionally with a required margin.

    loss = mean( -log sigmoid(chosen_rewards - rejected_rewards - margin) )

    InstructGPT, arXiv:2203.02155 eq. 1; the margin term is Llama 2's, arXiv:2307.09288 eq. 2
    (OpenRLHF 09f5ace ``PairWiseLoss``).

    Args:
        chosen_rewards: ``[B]`` scalar rewards of the chosen responses.
        rejected_rewards: ``[B]`` scalar rewards of the rejected responses.
        margin: ``[B]`` tensor or a number, or ``None`` for no margin.

    Returns:
        ``(loss, stats)`` with stats ``rm/loss``, ``rm/accuracy`` (fraction with chosen >
        rejected), ``rm/chosen_reward``, ``rm/rejected_reward`` and ``rm/margin`` (mean of
        chosen - rejected).
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    stats = {
        "rm/loss": loss,
        "rm/accuracy": (chosen_rewards > rejected_rewards).to(loss.dtype).mean(),
        "rm/chosen_reward": chosen_rewards.mean(),
        "rm/rejected_reward": rejected_rewards.mean(),
        "rm/margin": (chosen_rewards - rejected_rewards).mean(),
    }
    return loss, detach_stats(stats)
