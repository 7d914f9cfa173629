"""stage=distill: knowledge distillation, the student learning a teacher's token distributions (rlhf.trainers.distill)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from rlhf.config import (
    DISTILL_MODES,
    DTYPES,
    ROLLOUT_BACKENDS,
    RLHFConfig,
    Stage,
    check_train,
    distill_sequences_per_step,
    register_stage,
    require,
    require_choice,
)
from rlhf.stages.common import check_inputs


def validate(cfg: RLHFConfig, produced: Collection[Path]) -> None:
    check_inputs(cfg, produced)
    validate_distill(cfg)


def validate_distill(cfg: RLHFConfig) -> None:
    """stage=distill: the distill.* fields, the student's batch arithmetic, and the rollout when on-policy."""
    from rlhf.algorithms import DISTILLATION_LOSSES, LOSS_AGGREGATIONS

    d, run = cfg.distill, cfg.run
    DISTILLATION_LOSSES.check(d.loss, "distill.loss")
    LOSS_AGGREGATIONS.check(cfg.algorithm.loss_agg, "algorithm.loss_agg")
    require_choice(d.mode, DISTILL_MODES, "distill.mode")
    require(0.0 <= d.beta <= 1.0, f"distill.beta must be in [0, 1] (got {d.beta})")
    require(d.temperature > 0, f"distill.temperature must be > 0 (got {d.temperature})")
    require(d.top_k >= 0, f"distill.top_k must be >= 0, 0 meaning the full vocabulary (got {d.top_k})")
    require(0.0 <= d.lmbda <= 1.0, f"distill.lmbda must be in [0, 1] (got {d.lmbda})")
    require(d.num_workers >= 1, f"distill.num_workers must be >= 1 (got {d.num_workers})")
    require(run.eval_every >= 0 and run.save_every >= 0, "run.eval_every and run.save_every must be >= 0")
    require(bool(d.teacher_path), "distill.teacher_path is empty; set it to the teacher checkpoint")
    require(run.total_steps >= 1, f"run.total_steps must be >= 1 (got {run.total_steps})")
    require(run.eval_every >= 0, f"run.eval_every must be >= 0 (got {run.eval_every})")
    require_choice(cfg.model.dtype, DTYPES, "model.dtype")
    rows = distill_sequences_per_step(cfg)
    check_train(cfg.policy, "policy", rows)
    require(
        rows % d.num_workers == 0,
        f"{rows} rows per distillation step cannot be split over distill.num_workers {d.num_workers} teachers",
    )
    if d.mode == "on_policy":
        rollout = cfg.rollout
        require_choice(rollout.backend, ROLLOUT_BACKENDS, "rollout.backend")
        require(rollout.n_samples_per_prompt >= 1, "rollout.n_samples_per_prompt must be >= 1")
        require(rollout.sampling.max_new_tokens >= 1, "rollout.sampling.max_new_tokens must be >= 1")
        require(rollout.sampling.temperature > 0, "rollout.sampling.temperature must be > 0 for on-policy samples")


def run(cfg: RLHFConfig) -> dict[str, float]:
    from rlhf.trainers.distill import run_distill

    return run_distill(cfg)


def plan_roles(cfg: RLHFConfig, shape_of) -> list:
    from rlhf.plan import distill_roles

    return distill_roles(cfg, shape_of)


register_stage(
    Stage(
        names=("distill",),
        summary="knowledge distillation from a teacher, offline or on the student's own samples",
        family="offline",
        validate=validate,
        run=run,
        plan_roles=plan_roles,
    )
)
