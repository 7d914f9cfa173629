"""stage=online_dpo: sample → score → pair best vs worst → one DPO round → sync, repeated (rlhf.trainers.online_dpo)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from rlhf.config import (
    DTYPES,
    ROLLOUT_BACKENDS,
    RLHFConfig,
    Stage,
    check_reward,
    register_stage,
    require,
    require_choice,
)
from rlhf.stages.common import check_inputs
from rlhf.stages.offline import validate_offline

REFERENCES = ("initial", "previous")
"""online_dpo.reference: the frozen starting policy, or the policy as it was when the round began."""


def validate(cfg: RLHFConfig, produced: Collection[Path]) -> None:
    check_inputs(cfg, produced)
    validate_online_dpo(cfg)


def validate_online_dpo(cfg: RLHFConfig) -> None:
    """The DPO side (validate_offline: loss, schedule, batch arithmetic in pairs), the rollout and the reward."""
    from rlhf.models.peft_methods import PROMPT_METHODS, peft_method
    from rlhf.workers.objectives import OBJECTIVES

    validate_offline(cfg)
    objective = OBJECTIVES.get(cfg.offline.objective)
    require(
        objective.example_kind == "pair" and objective.model_kind == "causal_lm",
        f"offline.objective={cfg.offline.objective} is not a preference loss of the policy; "
        f"stage=online_dpo trains on pairs of its samples: use dpo (or simpo, orpo)",
    )
    online, run, rollout, policy = cfg.online_dpo, cfg.run, cfg.rollout, cfg.policy
    require_choice(online.reference, REFERENCES, "online_dpo.reference")
    require(online.epochs >= 1, f"online_dpo.epochs must be >= 1 (got {online.epochs})")
    require(online.nll_weight >= 0, f"online_dpo.nll_weight must be >= 0 (got {online.nll_weight})")
    require(
        cfg.offline.nll_weight == 0,
        f"stage=online_dpo reads its NLL weight from online_dpo.nll_weight; set offline.nll_weight=0 "
        f"(got {cfg.offline.nll_weight})",
    )
    require(
        online.nll_weight == 0 or cfg.offline.objective == "dpo",
        f"online_dpo.nll_weight={online.nll_weight} adds an NLL term to the dpo objective only "
        f"(offline.objective={cfg.offline.objective}); set it to 0 or use offline.objective=dpo",
    )
    require(
        online.reference == "initial" or not cfg.offline.reference_path,
        f"offline.reference_path={cfg.offline.reference_path} names a fixed reference, but online_dpo.reference="
        f"previous uses the policy of the round's start; unset offline.reference_path or use reference=initial",
    )
    require(run.total_steps >= 1, f"run.total_steps (rounds) must be >= 1 (got {run.total_steps})")
    require(
        run.rollout_batch_size >= policy.train_batch_size,
        f"a round pairs at most one best/worst sample per prompt: run.rollout_batch_size {run.rollout_batch_size} "
        f"prompts give at most {run.rollout_batch_size} pairs, fewer than policy.train_batch_size "
        f"{policy.train_batch_size} pairs per optimizer step; raise run.rollout_batch_size or lower the batch",
    )
    require(
        rollout.n_samples_per_prompt >= 2,
        f"rollout.n_samples_per_prompt must be >= 2 to pair samples of a prompt (got {rollout.n_samples_per_prompt})",
    )
    require_choice(rollout.backend, ROLLOUT_BACKENDS, "rollout.backend")
    require(rollout.num_engines >= 1, f"rollout.num_engines must be >= 1 (got {rollout.num_engines})")
    require(rollout.sampling.max_new_tokens >= 1, "rollout.sampling.max_new_tokens must be >= 1")
    require(0 < rollout.sampling.top_p <= 1, f"rollout.sampling.top_p must be in (0, 1] (got {rollout.sampling.top_p})")
    require(rollout.sampling.temperature > 0, "rollout.sampling.temperature must be > 0 to sample distinct responses")
    require_choice(cfg.model.dtype, DTYPES, "model.dtype")
    require(cfg.data.max_prompt_length >= 1, "data.max_prompt_length must be >= 1")
    method = peft_method(cfg.model)
    require(
        method not in PROMPT_METHODS,
        f"model.peft.method={method} cannot be merged into the rollout engines' weights; use lora, ia3, loha or lokr",
    )
    check_reward(cfg.reward)


def run(cfg: RLHFConfig) -> dict[str, float]:
    from rlhf.trainers.online_dpo import run_online_dpo

    return run_online_dpo(cfg)


def plan_roles(cfg: RLHFConfig, shape_of) -> list:
    from rlhf.plan import online_dpo_roles

    return online_dpo_roles(cfg, shape_of)


register_stage(
    Stage(
        names=("online_dpo",),
        summary="online / iterative DPO: pairs of the policy's own scored samples, one DPO round per step",
        family="online_preference",
        validate=validate,
        run=run,
        token_budget_roles=("reward",),
        plan_roles=plan_roles,
    )
)
