"""`rlhf stage=report report.run_dir=<dir>`: redraw the plots of a finished run or sweep.

A run directory (holding metrics.jsonl) gets <dir>/plots/*.png; a sweep directory (numbered job
directories, as Hydra's multirun writes) gets its summary table and the sweep comparison plot,
and each of its runs its own plots.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rlhf.config import RLHFConfig
from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)


def run_report(cfg: RLHFConfig) -> dict[str, float]:
    from rlhf.utils.plots import plot_run
    from rlhf.utils.sweep import write_summary

    if not cfg.report.run_dir:
        raise ConfigError("stage=report needs report.run_dir=<a run's output directory or a sweep directory>")
    run_dir = Path(cfg.report.run_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"report.run_dir {str(run_dir)!r} is not a directory")
    if (run_dir / "metrics.jsonl").exists():
        written = plot_run(run_dir)
        logger.info("report: %d plots in %s", len(written), run_dir / "plots")
        return {"report/plots": float(len(written))}
    runs = write_summary(run_dir)
    if not runs:
        raise ConfigError(
            f"report.run_dir {str(run_dir)!r} holds neither metrics.jsonl (a run) nor job directories (a sweep)"
        )
    written = [p for r in runs if r.output_dir for p in plot_run(r.output_dir)]
    logger.info("report: sweep of %d runs summarised in %s; %d run plots", len(runs), run_dir, len(written))
    return {"report/runs": float(len(runs)), "report/plots": float(len(written))}
