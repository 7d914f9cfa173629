"""A tiny GRPO run built in-process (real Ray, DeepSpeed policy, hf engine) for the overlapped-RL tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.cli import CONF_DIR
from rlhf.config import RLHFConfig
from rlhf.utils.metrics import read_metrics

# 2 prompts × 4 samples = 8 sequences per step, one optimizer step; lr 1e-3 so that one update moves the
# policy's logprobs measurably
TINY_GRPO = [
    "stage=grpo",
    "algorithm.kl_coef=0",
    "data.train=tiny:train:copy+reverse",
    "data.eval=null",
    "run.rollout_batch_size=2",
    "rollout.n_samples_per_prompt=4",
    "rollout.backend=hf",
    "rollout.sampling.max_new_tokens=6",
    "policy.num_workers=1",
    "policy.train_batch_size=8",
    "policy.micro_batch_size=8",
    "policy.optim.lr=1e-3",
    "run.eval_every=0",
    "run.progress_bar=false",
    "run.tensorboard=false",
    "run.plots=false",
]
CLOCK = ("timing/", "perf/", "weight_sync/seconds", "weight_sync/gb_per_s")


def compose_config(output_dir: Path, *overrides: str) -> RLHFConfig:
    with initialize_config_dir(CONF_DIR, version_base=None):
        raw = compose("config", overrides=[*TINY_GRPO, f"run.output_dir={output_dir}", *overrides])
    return OmegaConf.to_object(raw)  # type: ignore[return-value]


def step_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """Each training step's metrics, without what the clock measures."""
    rows = read_metrics(output_dir / "metrics.jsonl")
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(CLOCK)} for r in rows if "policy/loss" in r}
