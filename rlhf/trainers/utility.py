"""Run a stage that trains nothing (export, report: rlhf.stages, Stage.family "utility") after validating it.

Each stage's run function imports its module when called, so `rlhf stage=report` never pays for peft or DeepSpeed.
"""

from __future__ import annotations

from rlhf.config import RLHFConfig, get_stage, names_where, validate
from rlhf.errors import ConfigError


def run_utility(cfg: RLHFConfig) -> dict[str, float]:
    """Run `cfg.stage`; ConfigError before any work for an invalid config or a stage that is not a utility."""
    validate(cfg)
    stage = get_stage(cfg.stage)
    if stage.family != "utility":
        known = names_where(lambda s: s.family == "utility")
        raise ConfigError(f"stage={cfg.stage} has no utility entry point; known: {', '.join(known)}")
    return stage.run(cfg)
