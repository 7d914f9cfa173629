"""stage=export: merge an adapter or a checkpoint into a plain HF checkpoint (rlhf.trainers.export)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from rlhf.config import RLHFConfig, Stage, register_stage
from rlhf.stages.common import check_inputs


def validate(cfg: RLHFConfig, produced: Collection[Path]) -> None:
    check_inputs(cfg, produced)


def run(cfg: RLHFConfig) -> dict[str, float]:
    from rlhf.trainers.export import run_export

    return run_export(cfg)


register_stage(
    Stage(
        names=("export",),
        summary="merge an adapter or a checkpoint into a plain Hugging Face checkpoint",
        family="utility",
        validate=validate,
        run=run,
        trains=False,
    )
)
