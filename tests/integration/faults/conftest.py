"""Fault tests: a tiny GRPO run built in-process (real Ray, 2 DeepSpeed policy ranks, HF rollout engines)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.cli import CONF_DIR
from rlhf.config import RLHFConfig

# 4 prompts × 4 samples = 16 sequences per step; 2 ranks × micro 4 = 8 per optimizer step (2 per step).
SMALL = [
    "stage=grpo",
    "algorithm.kl_coef=0",  # no reference actor: one role fewer to start
    "data.train=tiny:train:copy+reverse",
    "data.eval=tiny:eval:copy+reverse",
    "run.rollout_batch_size=4",
    "rollout.n_samples_per_prompt=4",
    "rollout.backend=hf",
    "rollout.sampling.max_new_tokens=8",
    "policy.num_workers=2",
    "policy.train_batch_size=8",
    "policy.micro_batch_size=4",
    "cluster.collective_timeout_s=120",
    "run.eval_every=0",
    "run.eval_size=4",
    "run.progress_bar=false",
    "run.tensorboard=false",
    "run.plots=false",
]


def compose_config(output_dir: Path, *overrides: str) -> RLHFConfig:
    """The config `rlhf <SMALL> run.output_dir=<output_dir> <overrides>` would run."""
    with initialize_config_dir(CONF_DIR, version_base=None):
        raw = compose("config", overrides=[*SMALL, f"run.output_dir={output_dir}", *overrides])
    return OmegaConf.to_object(raw)  # type: ignore[return-value]
