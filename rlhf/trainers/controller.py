"""What every controller (RL, offline, distillation) does around its own `step`: the run's checkpoints,
the non-finite guard, the metrics sink and the count of steps done, and after each step: evaluate when
run.eval_every says, log, check for non-finite updates, checkpoint when run.save_every says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.config import RLHFConfig
from rlhf.trainers.checkpointing import CheckpointManager
from rlhf.trainers.nonfinite import NonFiniteGuard
from rlhf.utils.metrics import MetricsSink
from rlhf.utils.redact import config_container


class Controller:
    """Base of the controllers; a subclass calls `_start_bookkeeping` in __init__ and defines `evaluate`
    and `save_checkpoint`."""

    cfg: RLHFConfig

    def _start_bookkeeping(self, output_dir: Path) -> None:
        run_cfg = self.cfg.run
        self.checkpoints = CheckpointManager(output_dir / "checkpoints", keep_last=run_cfg.keep_last)
        self.nonfinite = NonFiniteGuard(run_cfg.max_consecutive_nonfinite)
        self.metrics = MetricsSink.for_run(output_dir, run_cfg, config=config_container(self.cfg))
        self.step_done = 0
        """Steps finished (and, once a checkpoint is written, saved with it)."""

    def evaluate(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_checkpoint(self) -> Path:
        raise NotImplementedError

    def _end_step(self, metrics: dict[str, Any]) -> dict[str, float]:
        """After step `step_done`: evaluate every run.eval_every steps, log, stop on non-finite updates
        (NonFiniteGuard), checkpoint every run.save_every steps unless inside a non-finite run; the logged metrics."""
        run_cfg = self.cfg.run
        if run_cfg.eval_every and self.step_done % run_cfg.eval_every == 0:
            metrics.update(self.evaluate())
        last = self.metrics.log(self.step_done, metrics)
        clean = self.nonfinite.check(self.step_done, last, self.checkpoints.latest())
        if clean and run_cfg.save_every and self.step_done % run_cfg.save_every == 0:
            self.save_checkpoint()
        return last

    def _evaluate_at_end(self, last: dict[str, float]) -> None:
        """Evaluate and log once more, unless `_end_step` just did for the last step; into `last`."""
        eval_every = self.cfg.run.eval_every
        if not eval_every or self.step_done % eval_every:
            last.update(self.metrics.log(self.step_done, self.evaluate()))
