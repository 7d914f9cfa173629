"""The stage registry: what `stage=<name>` runs, like the algorithm registries (rlhf.algorithms.registry).

A stage is one module of the rlhf.stages package that calls `register_stage(Stage(...))` at import:
its names, a one-line summary (docs/stages.md), its validation, its run function and the few facts
other code asks about a stage (does it train, which roles take token budgets, its sizing plan). The
registry lives with the schema, below every layer, so that the trainers' entry points and rlhf.plan
can read it; the stage modules sit on top (their functions import the trainers). They are found by
listing the rlhf.stages package on the first lookup (`pkgutil`), so a new stage is one module there
plus its conf/stage/<name>.yaml, and the schema names none of them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rlhf.errors import ConfigError

if TYPE_CHECKING:
    from rlhf.config.schema import RLHFConfig

STAGE_PACKAGE = "rlhf.stages"
"""The package whose modules register the stages (each imported on the first lookup)."""
FAMILIES = ("rl", "offline", "online_preference", "generation", "utility")
"""How docs/stages.md and the tests group the stages; code asks a stage's own attributes instead."""
TOKEN_BUDGET_ROLES = ("policy", "critic", "reference", "reward")
"""The roles with a max_tokens_per_micro_batch field."""


@dataclass(frozen=True)
class Stage:
    """One unit of `stage=<name>`: declared once, in its module of rlhf.stages."""

    names: tuple[str, ...]
    """The stage=<name> values it runs (each has a conf/stage/<name>.yaml)."""
    summary: str
    """One line for docs and `--help`-like listings."""
    family: str
    """One of FAMILIES (docs grouping)."""
    validate: Callable[[RLHFConfig, Collection[Path]], None]
    """Every check of this stage after the schema's own (rlhf.config.checks.validate): ConfigError/DataError,
    before any cluster work. The second argument holds the directories an earlier pipeline step will write."""
    run: Callable[[RLHFConfig], dict[str, float]]
    """Run a validated config; returns the final metrics (the console and sweep summary)."""
    trains: bool = True
    """It saves a trained <output_dir>/final: run.plots and run.final_eval apply after it."""
    token_budget_roles: tuple[str, ...] = ()
    """Roles of TOKEN_BUDGET_ROLES whose max_tokens_per_micro_batch this stage honours (others must stay unset)."""
    reference_group: bool = False
    """It starts the reference model as a group shaped by reference.num_workers / reference.zero_stage."""
    plan_roles: Optional[Callable[[RLHFConfig, Any], list]] = None
    """The worker groups it starts, for run.plan (rlhf.plan.plan_roles); None: nothing on Ray."""
    check_final_eval: Optional[Callable[[RLHFConfig], None]] = None
    """Its own checks of run.final_eval=true, before rlhf.trainers.evaluate.check_final_eval."""

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a stage needs at least one name")
        if self.family not in FAMILIES:
            raise ValueError(f"stage {self.names[0]}: family {self.family!r} is not one of {', '.join(FAMILIES)}")
        unknown = set(self.token_budget_roles) - set(TOKEN_BUDGET_ROLES)
        if unknown:
            raise ValueError(f"stage {self.names[0]}: token_budget_roles {sorted(unknown)} are not roles")


_STAGES: dict[str, Stage] = {}
_discovered = False


def register_stage(stage: Stage) -> Stage:
    """Add `stage` under each of its names; a name registered twice is a programming error."""
    for name in stage.names:
        if name in _STAGES and _STAGES[name] is not stage:
            raise ValueError(f"stage {name!r} is already registered")
    for name in stage.names:
        _STAGES[name] = stage
    return stage


def _discover() -> None:
    """Import every module of STAGE_PACKAGE once; each registers its stages."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(STAGE_PACKAGE)
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{STAGE_PACKAGE}.{module.name}")
    ordered = sorted(_STAGES.items(), key=lambda item: FAMILIES.index(item[1].family))  # stable: modules by name
    _STAGES.clear()
    _STAGES.update(ordered)
    _discovered = True


def stage_names() -> list[str]:
    """Every registered stage name: by family (FAMILIES), then module name, then as each module lists them."""
    _discover()
    return list(_STAGES)


def all_stages() -> list[Stage]:
    """Every registered stage once, in stage_names() order."""
    _discover()
    return list(dict.fromkeys(_STAGES.values()))


def get_stage(name: str) -> Stage:
    """The stage registered as `name`; ConfigError listing the known names otherwise."""
    _discover()
    if name not in _STAGES:
        raise ConfigError(f"stage={name!r} is not one of {', '.join(_STAGES)}")
    return _STAGES[name]


def names_where(predicate: Callable[[Stage], bool]) -> list[str]:
    """The names of the stages for which `predicate` holds, in stage_names() order."""
    return [name for name in stage_names() if predicate(_STAGES[name])]
