"""rollout.enable_sleep in a real RL run: the controller hands the engines' memory to the trainer between rollouts.

A short GRPO run (real Ray, one DeepSpeed policy rank, one hf engine) with every call at the engine
boundary recorded: each generate is preceded by a wake of what sleeps and followed by a sleep, each
weight sync by a wake of the weights alone, so the KV cache stays released from the end of one
rollout to the start of the next (scoring, logprobs, the update and the sync run while it is free).
On CPU the backends' sleep and wake are no-ops, so the same run also shows enable_sleep=true runs.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.cli import CONF_DIR
from rlhf.trainers.prepare import prepare
from rlhf.trainers.rl import RLTrainer
from rlhf.workers.rollout import SleepBetweenRollouts

pytestmark = [pytest.mark.ray]

# 2 prompts × 2 samples per step, one policy rank × micro 4: one optimizer step per step; 2 steps + final eval.
SMALL = [
    "stage=grpo",
    "rollout.enable_sleep=true",
    "algorithm.kl_coef=0",
    "data.train=tiny:train:copy+reverse",
    "data.eval=tiny:eval:copy+reverse",
    "run.total_steps=2",
    "run.rollout_batch_size=2",
    "rollout.n_samples_per_prompt=2",
    "rollout.backend=hf",
    "rollout.sampling.max_new_tokens=4",
    "rollout.eval_sampling.max_new_tokens=4",
    "policy.num_workers=1",
    "policy.train_batch_size=4",
    "policy.micro_batch_size=4",
    "cluster.collective_timeout_s=120",
    "run.eval_every=0",
    "run.eval_size=2",
    "run.progress_bar=false",
    "run.tensorboard=false",
    "run.plots=false",
]


def test_rl_run_sleeps_the_engines_between_rollouts(ray_cluster, tmp_path, engine_calls):
    with initialize_config_dir(CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=[*SMALL, f"run.output_dir={tmp_path}"]))
    trainer = RLTrainer(prepare(cfg))
    try:
        assert isinstance(trainer.rollout.memory, SleepBetweenRollouts)
        engine_calls.record(trainer.rollout.group)
        trainer.fit()
        (calls,) = engine_calls.take(trainer.rollout.group)
    finally:
        trainer.close()
    rollout, sync = ["generate", "sleep"], ["wake:weights", "load_weights"]
    assert calls == [
        *rollout,  # step 1 (the engines start awake)
        *sync,
        "wake:kv_cache",  # step 2
        *rollout,
        *sync,
        "wake:kv_cache",  # the final evaluation
        *rollout,
    ]
