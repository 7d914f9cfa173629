"""A tiny GRPO run built in-process (real Ray, DeepSpeed policy, hf engine) for the overlapped-RL tests, and a trainer
that records what each step trained on."""

from __future__ import annotations

import time
from pathlib import Path

import ray
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.cli import CONF_DIR
from rlhf.config import RLHFConfig
from rlhf.trainers.prepare import prepare
from rlhf.trainers.rl import RLTrainer
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


class Preempted(Exception):
    """Raised by Recorder before step `stop_at`: the run ends between steps, as a preempted job's."""


class Recorder(RLTrainer):
    """Records what each step trains on: its prompts (one per group, in row order) and, with the policy's version
    then, every row's version tag. Stops dead before step `stop_at`."""

    trained: list[list[str]]
    tags: list[tuple[int, list[int]]]
    stop_at: int | None = None

    def step(self, step):
        if step == self.stop_at:
            raise Preempted  # its last checkpoint is written
        return super().step(step)

    def _collect_once(self, step, timer, sampling_round=0):
        batch, rollout_stats, reward_stats = super()._collect_once(step, timer, sampling_round)
        self.trained.append([row["prompt_text"] for row in batch.metadata[:: self.n]])
        self.tags.append((self.policy_version, batch.versions.tolist()))
        return batch, rollout_stats, reward_stats

    def kill_engine(self) -> None:
        """Engine 0 killed, and gone for good before the step goes on: were it still answering the pre-sync ping,
        it would die inside the sync, which then waits out cluster.collective_timeout_s."""
        ray.kill(self.rollout.group.actors[0], no_restart=True)
        while 0 not in self.rollout.group.dead_ranks(timeout=60):
            time.sleep(0.1)


def fit(recorder: type[Recorder], cfg: RLHFConfig, *, stop_at: int | None = None, **options) -> Recorder:
    """A `recorder` run of `cfg` (stopped before step index `stop_at`), closed; `options` set on it first."""
    trainer = recorder(prepare(cfg))
    trainer.trained, trainer.tags, trainer.stop_at = [], [], stop_at
    for name, value in options.items():
        setattr(trainer, name, value)
    try:
        trainer.fit()
    except Preempted:
        pass
    finally:
        trainer.close()
    return trainer
