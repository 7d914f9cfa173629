"""Stopping a run whose updates keep going non-finite.

The train engine skips every optimizer step whose loss or gradient norm is NaN/inf, on all ranks
together, and each update reports `<role>/nonfinite_{skipped,consecutive,total,loss}`
(rlhf.engines.train_engine). The controller reads those metrics after each step: while a role is
inside a run of skipped steps it writes no checkpoint (the last one from before the run stays the
newest, so `run.resume=auto` picks it), and after run.max_consecutive_nonfinite skips in a row it
stops with a NonFiniteError that names the step, the metric and that checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from rlhf.errors import NonFiniteError

logger = logging.getLogger(__name__)

CONSECUTIVE = "/nonfinite_consecutive"


class NonFiniteGuard:
    def __init__(self, limit: int):
        """`limit`: run.max_consecutive_nonfinite (0: never stop)."""
        self.limit = limit

    def check(self, step: int, metrics: Mapping[str, float], last_checkpoint: Optional[Path]) -> bool:
        """After controller step `step`: raise NonFiniteError at the limit; else whether a checkpoint may be written."""
        streaks = {k[: -len(CONSECUTIVE)]: int(v) for k, v in metrics.items() if k.endswith(CONSECUTIVE) and v > 0}
        for role, consecutive in sorted(streaks.items()):
            if self.limit and consecutive >= self.limit:
                raise NonFiniteError(message(role, consecutive, step, metrics, self.limit, last_checkpoint))
        if streaks:
            logger.warning(
                "step %d: %s in a run of skipped non-finite updates; no checkpoint until an update is finite",
                step,
                ", ".join(f"{role} ({n} in a row)" for role, n in sorted(streaks.items())),
            )
        return not streaks


def combine(updates: list[Mapping[str, float]]) -> dict[str, float]:
    """The `*/nonfinite_*` metrics of several update calls in order, as one: skips summed, the rest the last call's."""
    merged: dict[str, float] = {}
    for update in updates:
        for key, value in update.items():
            if "/nonfinite_" in key:
                merged[key] = merged.get(key, 0.0) + value if key.endswith("/nonfinite_skipped") else value
    return merged


def message(
    role: str, consecutive: int, step: int, metrics: Mapping[str, float], limit: int, last_checkpoint: Optional[Path]
) -> str:
    what = "loss" if metrics.get(f"{role}/nonfinite_loss") else f"gradient norm ({role}/grad_norm)"
    total = int(metrics.get(f"{role}/nonfinite_total", consecutive))
    resume = (
        f"the last good checkpoint is {last_checkpoint} (run.resume=auto resumes from it)"
        if last_checkpoint is not None
        else "no checkpoint was written before it (run.save_every=0 or too early), so a new run starts from the model"
    )
    return (
        f"{role}: {consecutive} optimizer steps in a row were skipped because the {what} was not finite "
        f"(NaN/inf), the last at step {step}; {total} skipped in all. Stopped at run.max_consecutive_nonfinite="
        f"{limit}; {resume}. Look for NaN/inf in the data, rewards or advantages, or lower {role_lr(role)}."
    )


def role_lr(role: str) -> str:
    """The learning-rate field of the role a metric prefix names."""
    return "critic.optim.lr" if role == "critic" else "policy.optim.lr"
