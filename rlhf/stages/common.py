"""Checks every stage's `validate` starts with: model and dataset paths, PEFT, then the shared schema checks."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from rlhf.config import RLHFConfig, check_shared, get_stage


def check_inputs(cfg: RLHFConfig, produced: Collection[Path]) -> None:
    """Local model and dataset paths exist (unless inside `produced`), their weights load safely, the PEFT
    method fits the stage; then the cluster, token budgets and frozen groups (rlhf.config.check_shared)."""
    from rlhf.data.sources import check_dataset_paths
    from rlhf.models.paths import check_model_paths
    from rlhf.models.peft_methods import validate_peft

    check_model_paths(cfg, produced)
    check_dataset_paths(cfg, produced)
    validate_peft(cfg, rl_stage=get_stage(cfg.stage).family == "rl")
    check_shared(cfg)
