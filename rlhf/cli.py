"""Hydra entry point: compose config → validate and prepare → start Ray → train → close.

`rlhf stage=grpo model.path=... data.train=...` (or `python -m rlhf ...`); `-m` runs sweeps;
`run.plan=true` prints the sizing plan (rlhf.plan) instead of starting anything.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rlhf.config import RLHFConfig, get_stage, register_configs, validate
from rlhf.errors import ConfigError, RLHFError
from rlhf.utils.sweep import job_output_dir

logger = logging.getLogger("rlhf")
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
register_configs()


def train(cfg: RLHFConfig) -> dict[str, float]:
    """Run the configured stage (rlhf.stages); user errors surface before any Ray actor starts."""
    stage = get_stage(cfg.stage)
    if not stage.trains:
        return stage.run(cfg)
    if cfg.run.final_eval:  # its settings are user input too: wrong ones fail before training, not after
        from rlhf.trainers.evaluate import check_final_eval

        if stage.check_final_eval is not None:
            stage.check_final_eval(cfg)
        check_final_eval(cfg)
    from rlhf.utils.ray_session import held_ray_session

    with held_ray_session():  # the final evaluation runs on the cluster training started
        final = stage.run(cfg)
        if cfg.run.plots:
            from rlhf.utils.plots import write_plots

            write_plots(cfg.run.output_dir)
        if cfg.run.final_eval:  # the stage has saved <output_dir>/final and shut its actors down
            from rlhf.trainers.evaluate import run_final_eval

            final = {**final, **{f"final_{key}": value for key, value in run_final_eval(cfg).items()}}
    return final


def to_config(raw: DictConfig) -> RLHFConfig:
    """The typed config of a composed DictConfig; a value OmegaConf cannot resolve or convert is a ConfigError."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(raw)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        where = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise ConfigError(f"{where}{type(e).__name__}: {str(e).splitlines()[0]}") from None


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def _hydra_main(raw: DictConfig) -> float | None:
    _protect_secrets()
    try:
        cfg = to_config(raw)
        cfg.run.output_dir = job_output_dir(cfg.run.output_dir)  # one directory per sweep job
        validate(cfg)  # every field typed and in range, for every stage, before anything starts
        if cfg.run.plan:  # sizing only: print it and stop before Ray
            from rlhf.plan import build_plan, format_plan

            sys.stdout.write(format_plan(build_plan(cfg)))
            return None
        final = train(cfg)
    except RLHFError as error:
        logger.error("%s: %s", type(error).__name__, error)
        if os.environ.get("RLHF_FULL_ERROR"):
            raise
        sys.exit(2)
    return final.get("reward/mean")


def _protect_secrets() -> None:
    """Mask secrets in every log line, and in the config and overrides Hydra saved under .hydra/."""
    from hydra.core.hydra_config import HydraConfig

    from rlhf.utils.redact import install_log_redaction, redact_yaml_file

    install_log_redaction()
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:
        saved = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            redact_yaml_file(saved / name)


def check_group_overrides(overrides: list[str]) -> None:
    """ConfigError for `group=value` overrides of a conf/ group (stage, cluster, ...) naming no file of it.

    Hydra lists the options itself for most typos, but `stage=null` and `stage=[null]` crash inside Hydra with a
    long traceback. A list (`[a,b]`: Hydra merges the configs named) must name known configs only.
    """
    conf = Path(CONF_DIR)
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        group = conf / key
        if not sep or not group.is_dir():
            continue
        names = [value]
        if value.startswith("[") and value.endswith("]"):
            names = value[1:-1].split(",")
        if any(c in name for name in names for c in ",()[]*$"):  # sweeps, interpolations, nested lists
            continue
        known = sorted(p.stem for p in group.glob("*.yaml"))
        if not all(name.strip().strip("'\"") in known for name in names):
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(known)}")


def main() -> None:
    try:
        check_group_overrides([arg for arg in sys.argv[1:] if not arg.startswith("-")])
    except ConfigError as error:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logger.error("%s: %s", type(error).__name__, error)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
