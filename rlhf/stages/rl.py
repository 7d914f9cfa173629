"""The RL stages (PPO and the GRPO family): rollout → reward → advantages → policy (and critic) update → sync.

The eight names share one controller (rlhf.trainers.rl) and differ in conf/stage/<name>.yaml only
(algorithm.advantage, policy_loss, loss_agg, clip and KL settings; docs/algorithms.md).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from rlhf.config import (
    DTYPES,
    MISMATCH_ACTIONS,
    OLD_LOGPROBS,
    ROLLOUT_BACKENDS,
    RLHFConfig,
    Stage,
    check_reward,
    check_rollout_mode,
    check_shards,
    check_token_budgets,
    check_train,
    register_stage,
    require,
    require_choice,
    uses_critic,
    uses_reference,
)
from rlhf.stages.common import check_inputs

NAMES = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo", "ppo")


def validate(cfg: RLHFConfig, produced: Collection[Path]) -> None:
    check_inputs(cfg, produced)
    validate_rl(cfg)


def validate_rl(cfg: RLHFConfig) -> None:
    """The RL stages' fields (rollout, algorithm, reward, batch arithmetic of policy and critic)."""
    from rlhf.algorithms import ADVANTAGE_ESTIMATORS, IS_MODES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
    from rlhf.trainers.agent import check_agent

    run, algo, rollout = cfg.run, cfg.algorithm, cfg.rollout
    require(run.total_steps >= 1, f"run.total_steps must be >= 1 (got {run.total_steps})")
    require(run.rollout_batch_size >= 1, f"run.rollout_batch_size must be >= 1 (got {run.rollout_batch_size})")
    require(run.keep_last >= 1, f"run.keep_last must be >= 1 (got {run.keep_last})")
    require(run.eval_every >= 0 and run.save_every >= 0, "run.eval_every and run.save_every must be >= 0")
    require(
        run.resume in ("auto", "none") or bool(run.resume),
        "run.resume must be auto, none, or a checkpoint directory",
    )
    ADVANTAGE_ESTIMATORS.check(algo.advantage, "algorithm.advantage")
    POLICY_LOSSES.check(algo.policy_loss, "algorithm.policy_loss")
    LOSS_AGGREGATIONS.check(algo.loss_agg, "algorithm.loss_agg")
    KL_ESTIMATORS.check(algo.kl_estimator, "algorithm.kl_estimator")
    require_choice(algo.mismatch_action, MISMATCH_ACTIONS, "algorithm.mismatch_action")
    require_choice(algo.rollout_is, ("auto", *IS_MODES), "algorithm.rollout_is")
    check_rollout_mode(cfg)
    check_agent(cfg)
    require_choice(algo.old_logprobs, OLD_LOGPROBS, "algorithm.old_logprobs")
    require(0 <= algo.clip_low < 1, f"algorithm.clip_low must be in [0, 1) (got {algo.clip_low})")
    require(algo.clip_high >= 0, f"algorithm.clip_high must be >= 0 (got {algo.clip_high})")
    require(algo.dual_clip is None or algo.dual_clip > 1, f"algorithm.dual_clip must be > 1 (got {algo.dual_clip})")
    require(algo.kl_coef >= 0, f"algorithm.kl_coef must be >= 0 (got {algo.kl_coef})")
    require(algo.ppo_epochs >= 1, f"algorithm.ppo_epochs must be >= 1 (got {algo.ppo_epochs})")
    require(0 < algo.gamma <= 1 and 0 <= algo.lam <= 1, "algorithm.gamma must be in (0, 1] and lam in [0, 1]")
    group_based = algo.advantage in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
    require(
        not group_based or rollout.n_samples_per_prompt >= 2,
        f"algorithm.advantage={algo.advantage} compares samples of one prompt: "
        f"set rollout.n_samples_per_prompt >= 2 (got {rollout.n_samples_per_prompt})",
    )
    require(
        algo.max_sampling_rounds >= 1, f"algorithm.max_sampling_rounds must be >= 1 (got {algo.max_sampling_rounds})"
    )
    require(
        not algo.dynamic_sampling or rollout.n_samples_per_prompt >= 2,
        "algorithm.dynamic_sampling keeps groups whose samples score differently: "
        f"set rollout.n_samples_per_prompt >= 2 (got {rollout.n_samples_per_prompt})",
    )
    require_choice(rollout.backend, ROLLOUT_BACKENDS, "rollout.backend")
    require(rollout.num_engines >= 1, f"rollout.num_engines must be >= 1 (got {rollout.num_engines})")
    require(rollout.max_restarts >= 0, f"rollout.max_restarts must be >= 0 (got {rollout.max_restarts})")
    require(rollout.n_samples_per_prompt >= 1, "rollout.n_samples_per_prompt must be >= 1")
    require(rollout.sampling.max_new_tokens >= 1, "rollout.sampling.max_new_tokens must be >= 1")
    require(0 < rollout.sampling.top_p <= 1, f"rollout.sampling.top_p must be in (0, 1] (got {rollout.sampling.top_p})")
    require(rollout.sampling.temperature > 0, "rollout.sampling.temperature must be > 0 for training rollouts")
    require_choice(cfg.model.dtype, DTYPES, "model.dtype")
    require(cfg.model.lora.rank >= 0, f"model.lora.rank must be >= 0 (got {cfg.model.lora.rank})")
    sequences = run.rollout_batch_size * rollout.n_samples_per_prompt
    arithmetic = (
        f"run.rollout_batch_size {run.rollout_batch_size} × rollout.n_samples_per_prompt {rollout.n_samples_per_prompt}"
    )
    check_train(cfg.policy, "policy", sequences, arithmetic)
    if uses_critic(cfg):
        from rlhf.models.peft_methods import check_scalar_head_peft

        check_train(cfg.critic, "critic", sequences, arithmetic)
        check_scalar_head_peft(cfg.model, f"critic (algorithm.advantage={algo.advantage})")
    require(cfg.data.max_prompt_length >= 1, "data.max_prompt_length must be >= 1")
    if uses_reference(cfg):
        check_shards(sequences, arithmetic, cfg.reference.num_workers, "reference.num_workers")
    if cfg.reward.model_path:
        check_shards(sequences, arithmetic, cfg.reward.num_workers, "reward.num_workers")
    check_reward(cfg.reward)
    check_token_budgets(cfg)


def run(cfg: RLHFConfig) -> dict[str, float]:
    """One RL run (PPO / the GRPO family)."""
    from rlhf.trainers.prepare import prepare
    from rlhf.trainers.rl import RLTrainer
    from rlhf.trainers.runner import fit_on_cluster

    prepared = prepare(cfg)
    return fit_on_cluster(cfg, prepared.output_dir, lambda: RLTrainer(prepared))


def plan_roles(cfg: RLHFConfig, shape_of) -> list:
    from rlhf.plan import rl_roles

    return rl_roles(cfg, shape_of)


register_stage(
    Stage(
        names=NAMES,
        summary="RL: PPO (critic, GAE) and the GRPO family (group-relative advantages), on rollout engines",
        family="rl",
        validate=validate,
        run=run,
        token_budget_roles=("policy", "critic", "reference", "reward"),
        reference_group=True,
        plan_roles=plan_roles,
    )
)
