"""Generation/eval test set-up: configs composed from conf/ like the CLI, small sizes, the hf rollout backend."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.cli import CONF_DIR
from rlhf.config import RLHFConfig

SMALL = [
    "model.path=tiny",
    "rollout.backend=hf",
    "rollout.num_engines=1",
    "rollout.n_samples_per_prompt=4",
    "rollout.sampling.max_new_tokens=8",
    "rollout.eval_sampling.max_new_tokens=8",
    "cluster.rollout.num_cpus=0.5",
    "run.progress_bar=false",
]


def compose_config(stage: str, output_dir: Path, *overrides: str) -> RLHFConfig:
    """The config `rlhf stage=<stage> <SMALL> run.output_dir=<output_dir> <overrides>` would run."""
    with initialize_config_dir(CONF_DIR, version_base=None):
        raw = compose("config", overrides=[f"stage={stage}", *SMALL, f"run.output_dir={output_dir}", *overrides])
    return OmegaConf.to_object(raw)  # type: ignore[return-value]
