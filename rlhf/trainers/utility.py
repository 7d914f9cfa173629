"""Stages that train nothing (rlhf.config.UTILITY_STAGES): validate the config, then run one function.

Each entry imports its module when called, so `rlhf stage=report` never pays for peft or DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable

from rlhf.config import RLHFConfig, validate
from rlhf.errors import ConfigError


def _export(cfg: RLHFConfig) -> dict[str, float]:
    from rlhf.trainers.export import run_export

    return run_export(cfg)


def _report(cfg: RLHFConfig) -> dict[str, float]:
    from rlhf.trainers.report import run_report

    return run_report(cfg)


UTILITIES: dict[str, Callable[[RLHFConfig], dict[str, float]]] = {"export": _export, "report": _report}
"""stage name -> its entry point (each returns a few numbers for the console/sweep summary)."""


def run_utility(cfg: RLHFConfig) -> dict[str, float]:
    """Run `cfg.stage`; ConfigError before any work for an invalid config or an unknown stage."""
    validate(cfg)
    if cfg.stage not in UTILITIES:
        raise ConfigError(f"stage={cfg.stage} has no utility entry point; known: {', '.join(UTILITIES)}")
    return UTILITIES[cfg.stage](cfg)
