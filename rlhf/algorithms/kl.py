"""KL divergence to the reference policy: estimators, KL-in-reward, KL-as-loss, coefficient control.

All estimators estimate KL(pi || pi_ref) per token from samples of pi (Schulman, "Approximating KL
Divergence", 2020, http://joschu.net/blog/kl-approx.html), with log_ratio = logprobs - ref_logprobs:

- ``k1``: log_ratio                                   unbiased, high variance, can be negative
- ``k2``: 0.5 * log_ratio^2                           biased, low variance, >= 0
- ``k3``: exp(-log_ratio) + log_ratio - 1             unbiased, low variance, >= 0
          = exp(ref - lp) - (ref - lp) - 1

``k3`` clamps ``ref - lp`` to [-20, 20] before the exponential and the result to at most 10, as
verl's ``low_var_kl`` does (verl 012be9d, ``verl/trainer/ppo/core_algos.py`` ``kl_penalty``): a token
beyond the clamp contributes 10 and no gradient, instead of an overflow.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from rlhf.algorithms.aggregation import Count, aggregate
from rlhf.algorithms.registry import Registry
from rlhf.algorithms.utils import Stats, detach_stats, masked_mean, scatter_to_last_token
from rlhf.errors import ConfigError

LOG_RATIO_CLAMP = 20.0
"""|ref - lp| above this is clamped before ``exp`` in ``k3``."""

K3_MAX = 10.0
"""Upper clamp of the per-token ``k3`` value."""


class KLEstimator(Protocol):
    """Shared signature of every ``KL_ESTIMATORS`` entry: per-token KL estimate, same shape."""

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor: ...


KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def _k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def _k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def _k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_ratio = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(max=K3_MAX)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) with the named estimator (formulas: module docstring).

    Args:
        logprobs: ``[B, R]`` log-probabilities of the sampled tokens under pi.
        ref_logprobs: ``[B, R]`` the same tokens under pi_ref.
        kind: a ``KL_ESTIMATORS`` name: ``k1``, ``k2``, ``k3``.

    Returns:
        ``[B, R]`` per-token estimates (not masked).

    Raises:
        ConfigError: unknown ``kind``.
    """
    return KL_ESTIMATORS.get(kind)(logprobs, ref_logprobs)


@torch.no_grad()
def rollout_mismatch(engine_logprobs: Tensor, trainer_logprobs: Tensor, mask: Tensor) -> Stats:
    """How far the rollout engine's sampling distribution is from the trainer's, on the engine's own samples.

    logprob_diff    = mean_j |trainer_j - engine_j|
    mismatch_kl     = mean_j k3(engine_j, trainer_j)          KL(pi_engine || pi_trainer)
    mismatch_kl_max = max_i mean_{j in row i} k3(...)         the worst sequence

    The samples come from the engine, so ``k3`` with the engine as pi and the trainer as the reference estimates
    KL(pi_engine || pi_trainer) without bias (module docstring). With the same weights on both sides it is float
    noise (float32 on CPU: ~1e-10; bf16 engines against a float32 trainer: ~1e-3, Yao et al. 2025, "Your Efficient
    RL Framework Secretly Brings You Off-Policy RL Training"); a wrong chat template, tokenizer, dtype or sampling
    temperature on one side, or weights that never reached the engine, make it large.

    Args:
        engine_logprobs: ``[B, R]`` log-probabilities the engine reported for its sampled tokens.
        trainer_logprobs: ``[B, R]`` the trainer's log-probabilities of the same tokens, same temperature.
        mask: ``[B, R]`` real response tokens.

    Returns:
        ``rollout/logprob_diff``, ``rollout/mismatch_kl`` and ``rollout/mismatch_kl_max`` (0-d tensors; 0 for a
        batch without real tokens).
    """
    diff, kl = rollout_mismatch_terms(engine_logprobs, trainer_logprobs, mask)
    per_sequence = masked_mean(kl, mask, dim=-1)
    return {
        "rollout/logprob_diff": masked_mean(diff, mask),
        "rollout/mismatch_kl": masked_mean(kl, mask),
        "rollout/mismatch_kl_max": per_sequence.max() if per_sequence.numel() else per_sequence.sum(),
    }


def rollout_mismatch_terms(engine_logprobs: Tensor, trainer_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per token ``[B, R]``: |trainer - engine| and k3(engine, trainer), 0 where ``mask`` is 0 (`rollout_mismatch`
    averages them; a trainer that sees the batch in pieces sums them with the global token count)."""
    real = mask.bool()
    zero = torch.zeros_like(engine_logprobs)
    diff = torch.where(real, (trainer_logprobs - engine_logprobs).abs(), zero)
    return diff, torch.where(real, kl_estimate(engine_logprobs, trainer_logprobs, "k3"), zero)


@torch.no_grad()
def kl_in_reward(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float | Tensor,
    kind: str = "k1",
) -> Tensor:
    """Per-token rewards with a KL penalty on every token and the score on the last one.

    r_j = -kl_coef * kl_j + [j is the last real token] * score

    Ziegler et al. 2019, arXiv:1909.08593 eq. 2 (R(x, y) = r(x, y) - beta * log(pi / rho)), spread
    over tokens as in InstructGPT (arXiv:2203.02155 eq. 2); ``k1`` is the default, as in OpenRLHF
    and verl. Computed without gradient.

    Args:
        scores: ``[B]`` outcome scores.
        logprobs: ``[B, R]`` rollout-policy log-probabilities of the response tokens.
        ref_logprobs: ``[B, R]`` reference log-probabilities of the same tokens.
        mask: ``[B, R]`` real response tokens.
        kl_coef: penalty coefficient (e.g. ``controller.value``).
        kind: a ``KL_ESTIMATORS`` name.

    Returns:
        ``[B, R]`` token rewards, 0 at masked positions.
    """
    kl = kl_estimate(logprobs, ref_logprobs, kind)
    penalty = torch.where(mask.bool(), -kl_coef * kl, torch.zeros_like(kl))
    return penalty + scatter_to_last_token(scores, mask).to(penalty.dtype)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kind: str = "k3",
    agg: str = "token_mean",
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    constant_normalizer: Count | None = None,
) -> tuple[Tensor, Stats]:
    """KL to the reference as a loss term (GRPO style) instead of a reward penalty.

    loss = aggregate(kl_estimate(logprobs, ref_logprobs, kind), mask, agg)

    GRPO uses ``k3`` (arXiv:2402.03300 eq. 4). The caller multiplies by its coefficient.

    Args:
        logprobs: ``[B, R]`` current-policy log-probabilities (with gradient).
        ref_logprobs: ``[B, R]`` reference log-probabilities.
        mask: ``[B, R]`` real response tokens.
        kind: a ``KL_ESTIMATORS`` name.
        agg: a ``LOSS_AGGREGATIONS`` mode.
        global_tokens: see :func:`rlhf.algorithms.aggregation.aggregate`.
        global_seqs: see ``aggregate``.
        constant_normalizer: see ``aggregate``.

    Returns:
        ``(loss, stats)`` with stats ``policy/kl_loss`` (the loss) and ``policy/ref_kl_k1``
        (token-mean of k1, the plain log-ratio, for monitoring).
    """
    real = mask.bool()
    logprobs = torch.where(real, logprobs, torch.zeros_like(logprobs))
    ref_logprobs = torch.where(real, ref_logprobs, torch.zeros_like(ref_logprobs))
    kl = kl_estimate(logprobs, ref_logprobs, kind)
    loss = aggregate(
        kl,
        mask,
        agg,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        constant_normalizer=constant_normalizer,
    )
    stats = {"policy/kl_loss": loss, "policy/ref_kl_k1": masked_mean(logprobs - ref_logprobs, mask)}
    return loss, detach_stats(stats)


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op; present so both controllers are used the same way."""


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards a target.

    error = clip(current_kl / target - 1, -0.2, 0.2)
    value <- value * (1 + error * n_steps / horizon)

    Ziegler et al. 2019, arXiv:1909.08593 §2.2 (beta_{t+1} = beta_t (1 + K_beta e_t)), with
    K_beta = n_steps / horizon as in OpenRLHF and verl ``AdaptiveKLController``. KL above the
    target raises the coefficient, KL below lowers it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ConfigError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ConfigError(f"KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ConfigError(f"KL horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Move ``value`` after a step that saw ``current_kl`` over ``n_steps`` samples.

        Runs on the driver once per step; a tensor ``current_kl`` is read to the host here.
        """
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
