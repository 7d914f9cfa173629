"""stage=generate: sample responses over a prompt set into datasets, resumable by shard (rlhf.trainers.generate)."""

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
    from rlhf.trainers.generate import run_generate

    return run_generate(cfg)


def plan_roles(cfg: RLHFConfig, shape_of) -> list:
    from rlhf.plan import generation_roles

    return generation_roles(cfg, shape_of)


register_stage(
    Stage(
        names=("generate",),
        summary="sample a model over prompts into a dataset; best-of-n rejection sampling, preference pairs",
        family="generation",
        validate=validate,
        run=run,
        trains=False,
        token_budget_roles=("reward",),
        plan_roles=plan_roles,
    )
)
