"""Hydra entry point: compose config → validate and prepare → start Ray → train → close.

`rlhf stage=grpo model.path=... data.train=...` (or `python -m rlhf ...`); `-m` runs sweeps.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rlhf.config import GENERATION_STAGES, OFFLINE_STAGES, UTILITY_STAGES, RLHFConfig, register_configs
from rlhf.errors import RLHFError
from rlhf.utils.sweep import job_output_dir

logger = logging.getLogger("rlhf")
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
register_configs()


def train(cfg: RLHFConfig) -> dict[str, float]:
    """Run the configured stage; user errors surface before any Ray actor starts."""
    if cfg.stage in UTILITY_STAGES:
        from rlhf.trainers.utility import run_utility

        return run_utility(cfg)
    if cfg.stage in GENERATION_STAGES:
        from rlhf.trainers.evaluate import run_eval
        from rlhf.trainers.generate import run_generate

        return run_generate(cfg) if cfg.stage == "generate" else run_eval(cfg)
    if cfg.run.final_eval:  # its settings are user input too: wrong ones fail before training, not after
        from rlhf.trainers.evaluate import check_final_eval

        check_final_eval(cfg)
    if cfg.stage == "distill":
        from rlhf.trainers.distill import run_distill

        final = run_distill(cfg)
    elif cfg.stage == "online_dpo":
        from rlhf.trainers.online_dpo import run_online_dpo

        final = run_online_dpo(cfg)
    elif cfg.stage in OFFLINE_STAGES:
        from rlhf.trainers.offline import run_offline

        final = run_offline(cfg)
    else:
        final = train_rl(cfg)
    if cfg.run.plots:
        from rlhf.utils.plots import write_plots

        write_plots(cfg.run.output_dir)
    if cfg.run.final_eval:  # the stage has saved <output_dir>/final and shut its actors down
        from rlhf.trainers.evaluate import run_final_eval

        final = {**final, **{f"final_{key}": value for key, value in run_final_eval(cfg).items()}}
    return final


def train_rl(cfg: RLHFConfig) -> dict[str, float]:
    """One RL run (PPO / the GRPO family)."""
    from rlhf.trainers.prepare import prepare
    from rlhf.trainers.rl import RLTrainer
    from rlhf.trainers.runner import fit_on_cluster

    prepared = prepare(cfg)
    return fit_on_cluster(cfg, prepared.output_dir, lambda: RLTrainer(prepared))


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def _hydra_main(raw: DictConfig) -> float | None:
    cfg: RLHFConfig = OmegaConf.to_object(raw)  # type: ignore[assignment]
    cfg.run.output_dir = job_output_dir(cfg.run.output_dir)  # one directory per sweep job
    try:
        final = train(cfg)
    except RLHFError as error:
        logger.error("%s: %s", type(error).__name__, error)
        if os.environ.get("RLHF_FULL_ERROR"):
            raise
        sys.exit(2)
    return final.get("reward/mean")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
