"""stage=eval: accuracy, pass@k, reward means, judge win rate of one model (rlhf.trainers.evaluate)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from rlhf.config import RLHFConfig, Stage, register_stage
from rlhf.stages.common import check_inputs


def validate(cfg: RLHFConfig, produced: Collection[Path]) -> None:
    from rlhf.trainers.generate import validate_generation

    check_inputs(cfg, produced)
    validate_generation(cfg)


def run(cfg: RLHFConfig) -> dict[str, float]:
    from rlhf.trainers.evaluate import run_eval

    return run_eval(cfg)


def plan_roles(cfg: RLHFConfig, shape_of) -> list:
    from rlhf.plan import generation_roles

    return generation_roles(cfg, shape_of)


register_stage(
    Stage(
        names=("eval",),
        summary="accuracy, pass@k, reward means and judge win rate of a model on prompts",
        family="generation",
        validate=validate,
        run=run,
        trains=False,
        token_budget_roles=("reward",),
        plan_roles=plan_roles,
    )
)
