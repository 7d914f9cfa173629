"""Pure-torch algorithm core: advantages, policy/value losses, KL, preference and distillation losses.

No Ray, no DeepSpeed, no config objects, no global state, no host syncs (``.item()``) in a loss.

Conventions
===========

Shapes
    B sequences per batch, R response-token positions, V vocabulary size.

    - Per-token tensors are ``[B, R]`` and cover the **response tokens only**.
    - Per-sequence tensors are ``[B]`` (scores, group ids, summed sequence log-probabilities).
    - Logits are ``[B, R, V]`` (distillation) or ``[B, T, V]`` for a full sequence (SFT helper).

Alignment of log-probabilities
    ``logprobs[:, j]`` is log p(response token j | prompt, response tokens 0..j-1). If the full
    sequence is ``prompt (P tokens) + response``, the causal LM logits at full position
    ``P + j - 1`` score response token j, i.e. logits at position t score token t + 1 of the full
    sequence. ``values[:, j]`` is the critic's value of the same prefix as ``logprobs[:, j]``.

Masks
    ``mask`` ``[B, R]`` (bool or float) is nonzero on real response tokens; right padding (and any
    other position without loss) is 0. A float mask is read as ``mask != 0``, never as a weight.
    Values at masked positions never change a result: they are selected away with
    ``torch.where`` (they must be finite where a loss needs their gradient to be finite).

Losses
    ``loss_fn(tensors..., mask, *, hyperparameters...) -> (loss, stats)``: ``loss`` is a 0-d
    tensor, ``stats`` a ``dict[str, Tensor]`` of detached 0-d tensors with namespaced keys
    (``policy/clip_frac``, ``critic/value_clip_frac``, ``dpo/reward_accuracy``, ...). Per-token
    losses reduce through :func:`aggregate` (one place, data-parallel invariant via
    ``global_tokens`` / ``global_seqs``). Sequence-level losses (DPO family, SimPO, ORPO, KTO,
    reward model) take ``[B]`` inputs and average over the batch.

Registries
    Every family is a :class:`~rlhf.algorithms.registry.Registry` whose entries share one
    ``Protocol`` signature; unknown names raise ``rlhf.errors.ConfigError`` listing the known
    names, close matches first. ``ADVANTAGE_ESTIMATORS``, ``POLICY_LOSSES``, ``KL_ESTIMATORS``,
    ``PREFERENCE_LOSSES``, ``DISTILLATION_LOSSES``, ``LOSS_AGGREGATIONS``.
"""

from rlhf.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    compute_discounted_returns,
    compute_gae_advantages,
    compute_grpo_advantages,
    compute_reinforce_pp_advantages,
    compute_reinforce_pp_baseline_advantages,
    compute_rloo_advantages,
)
from rlhf.algorithms.aggregation import LOSS_AGGREGATIONS, LossAggregation, aggregate, count_seqs, count_tokens
from rlhf.algorithms.distillation import (
    DISTILLATION_LOSSES,
    DistillationLoss,
    distillation_loss,
    forward_kl_loss,
    jsd_loss,
    reverse_kl_loss,
)
from rlhf.algorithms.entropy import entropy_from_logits, logprobs_from_logits
from rlhf.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    KLEstimator,
    kl_estimate,
    kl_in_reward,
    kl_loss,
    rollout_mismatch,
    rollout_mismatch_terms,
)
from rlhf.algorithms.policy_losses import (
    IS_MODES,
    POLICY_LOSSES,
    PolicyLoss,
    compute_rollout_is_weights,
    gspo_loss,
    ppo_policy_loss,
)
from rlhf.algorithms.preference_losses import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    dpo_hinge_loss,
    dpo_loss,
    dpo_sigmoid_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    pairwise_reward_loss,
    simpo_loss,
)
from rlhf.algorithms.registry import Registry
from rlhf.algorithms.sft import IGNORE_INDEX, sft_loss, sft_loss_from_logits
from rlhf.algorithms.utils import (
    Stats,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_logprobs,
)
from rlhf.algorithms.value_loss import value_loss

__all__ = [
    # registries and their signatures
    "Registry",
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimator",
    "POLICY_LOSSES",
    "PolicyLoss",
    "KL_ESTIMATORS",
    "KLEstimator",
    "PREFERENCE_LOSSES",
    "PreferenceLoss",
    "DISTILLATION_LOSSES",
    "DistillationLoss",
    "LOSS_AGGREGATIONS",
    "LossAggregation",
    # aggregation and masked helpers
    "aggregate",
    "count_tokens",
    "count_seqs",
    "Stats",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "sequence_logprobs",
    # advantages
    "compute_discounted_returns",
    "compute_gae_advantages",
    "compute_grpo_advantages",
    "compute_rloo_advantages",
    "compute_reinforce_pp_advantages",
    "compute_reinforce_pp_baseline_advantages",
    # policy and value
    "ppo_policy_loss",
    "gspo_loss",
    "IS_MODES",
    "compute_rollout_is_weights",
    "value_loss",
    # logits helpers
    "entropy_from_logits",
    "logprobs_from_logits",
    # KL
    "kl_estimate",
    "kl_in_reward",
    "kl_loss",
    "rollout_mismatch",
    "rollout_mismatch_terms",
    "FixedKLController",
    "AdaptiveKLController",
    # preference
    "dpo_loss",
    "dpo_sigmoid_loss",
    "ipo_loss",
    "dpo_hinge_loss",
    "simpo_loss",
    "orpo_loss",
    "kto_loss",
    "pairwise_reward_loss",
    # distillation
    "distillation_loss",
    "forward_kl_loss",
    "reverse_kl_loss",
    "jsd_loss",
    # sft
    "IGNORE_INDEX",
    "sft_loss",
    "sft_loss_from_logits",
]
