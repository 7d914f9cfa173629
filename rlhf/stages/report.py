"""stage=report: plots (and a sweep's table) of finished runs, without training (rlhf.trainers.report)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from rlhf.config import RLHFConfig, Stage, register_stage
from rlhf.stages.common import check_inputs


def validate(cfg: RLHFConfig, produced: Collection[Path]) -> None:
    check_inputs(cfg, produced)  # model/dataset paths, PEFT, cluster: every stage starts with it


def run(cfg: RLHFConfig) -> dict[str, float]:
    from rlhf.trainers.report import run_report  # imported when run: listing stages stays cheap

    return run_report(cfg)


register_stage(
    Stage(
        names=("report",),
        summary="plots (and a sweep's table) of finished runs, without training",
        family="utility",
        validate=validate,
        run=run,
        trains=False,
    )
)
