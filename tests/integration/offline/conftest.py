"""Offline-stage tests: the session's real Ray cluster (tests/conftest.py), configs composed from conf/ like the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.cli import CONF_DIR
from rlhf.config import RLHFConfig

# 2 DeepSpeed ranks × micro 2 examples, 8 examples (16 rows for pairs/KTO) per optimizer step.
SMALL = [
    "policy.num_workers=2",
    "policy.train_batch_size=8",
    "policy.micro_batch_size=2",
    "policy.optim.warmup_steps=0",
    "policy.optim.scheduler=constant",
    "cluster.collective_timeout_s=120",
    "run.progress_bar=false",
    "run.tensorboard=false",
    "run.plots=false",
    "run.eval_every=0",
    "run.eval_size=32",
]


def compose_config(stage: str, output_dir: Path, *overrides: str) -> RLHFConfig:
    """The config `python -m rlhf stage=<stage> <SMALL> <overrides>` would run."""
    with initialize_config_dir(CONF_DIR, version_base=None):
        raw = compose("config", overrides=[f"stage={stage}", *SMALL, f"run.output_dir={output_dir}", *overrides])
    return OmegaConf.to_object(raw)  # type: ignore[return-value]


@pytest.fixture(scope="session")
def offline_ray(ray_cluster):
    """One Ray session for every offline test (run_offline joins it instead of starting its own)."""
    yield ray_cluster


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A random tiny qwen2 causal LM (vocab 64, hidden 128, 2 layers), as a plain HF checkpoint."""
    from rlhf.models.tiny import build_tiny_model, save_tiny_model

    model = build_tiny_model("qwen2", vocab_size=64, seed=0)
    return str(save_tiny_model(model, None, tmp_path_factory.mktemp("tiny-policy")))
