"""stage=generate and stage=eval: sample one model on rollout engines, train nothing.

generate writes the samples into datasets, resumable by shard (rlhf.trainers.generate); eval reports
accuracy, pass@k, reward means and the judge's win rate (rlhf.trainers.evaluate). Both are checked by
rlhf.trainers.generate.validate_generation and sized alike (rlhf.plan.generation_roles).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from rlhf.config import RLHFConfig, Stage, register_stage
from rlhf.stages.common import check_inputs


def validate(cfg: RLHFConfig, produced: Collection[Path]) -> None:
    from rlhf.trainers.generate import validate_generation

    check_inputs(cfg, produced)
    validate_generation(cfg)


def run_generate(cfg: RLHFConfig) -> dict[str, float]:
    from rlhf.trainers.generate import run_generate

    return run_generate(cfg)


def run_eval(cfg: RLHFConfig) -> dict[str, float]:
    from rlhf.trainers.evaluate import run_eval

    return run_eval(cfg)


def plan_roles(cfg: RLHFConfig, shape_of) -> list:
    from rlhf.plan import generation_roles

    return generation_roles(cfg, shape_of)


for name, run, summary in (
    ("generate", run_generate, "sample a model over prompts into datasets: best-of-n rejection sampling, pairs"),
    ("eval", run_eval, "accuracy, pass@k, reward means and judge win rate of a model on prompts"),
):
    register_stage(
        Stage(
            names=(name,),
            summary=summary,
            family="generation",
            validate=validate,
            run=run,
            trains=False,
            token_budget_roles=("reward",),
            plan_roles=plan_roles,
        )
    )
