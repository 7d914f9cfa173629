"""A rollout engine killed mid-run (real `ray.kill`) is restarted, gets the current policy weights, and the
run goes on; past rollout.max_restarts the run stops with RunStoppedError.

Two engines, so the survivor's re-join of the re-formed weight-sync group is exercised too. Engine 0
is killed right before the generate of step 2 (the call fails on a dead actor); engine 1 right
before the sync of step 3 (the pre-sync ping finds it). Parity 1e-4 between engine and trainer
float32 logprobs of the same samples, as in tests/integration/sync; lr 1e-3 moves the tiny policy's
logprobs by far more than that within three steps, so stale engine weights would fail the check.
"""

from __future__ import annotations

import time

import pytest
import ray
import torch

from rlhf.config import SamplingConfig
from rlhf.errors import RunStoppedError
from rlhf.models.loading import load_causal_lm
from rlhf.models.logprobs import response_logprobs
from rlhf.trainers.prepare import prepare
from rlhf.trainers.rl import RLTrainer, build_rollout_batch
from rlhf.trainers.roles import stop_on_dead_rank
from rlhf.utils.metrics import read_metrics
from rlhf.workers.policy import PolicyWorker

from .conftest import compose_config

pytestmark = [pytest.mark.ray]

PARITY = 1e-4


class EngineKillingTrainer(RLTrainer):
    """Kills engine 0 before step 2's generate and engine 1 before step 3's sync (steps count from 1)."""

    def step(self, step: int) -> dict[str, float]:
        if step == 1:
            ray.kill(self.rollout.group.actors[0], no_restart=True)
        return super().step(step)

    def sync(self) -> dict[str, float]:
        if self.step_done == 2:  # inside step 3 (step_done is updated after step() returns)
            ray.kill(self.rollout.group.actors[1], no_restart=True)
            wait_until_dead(self.rollout.group, 1)
        return super().sync()


def wait_until_dead(group, rank: int, timeout_s: float = 60.0) -> None:
    """ray.kill returns before the process is gone: wait until a ping finds it dead, so the trainer's pre-sync
    ping does too. (Were the engine still answering, it would die inside the sync, and the trainer's send
    would wait out cluster.collective_timeout_s first: seen as a 144 s run of this test instead of 22 s.)"""
    deadline = time.monotonic() + timeout_s
    while rank not in group.dead_ranks(timeout=timeout_s):
        assert time.monotonic() < deadline, f"engine {rank} still answers {timeout_s}s after ray.kill"
        time.sleep(0.2)


def test_killed_engines_restart_with_current_weights(ray_cluster, tmp_path):
    cfg = compose_config(
        tmp_path / "run", "rollout.num_engines=2", "rollout.max_restarts=2", "run.total_steps=3", "policy.optim.lr=1e-3"
    )
    run = prepare(cfg)
    trainer = EngineKillingTrainer(run)
    try:
        first_pids = [p["pid"] for p in trainer.rollout.group.ping()]
        trainer.fit()

        rows = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "policy/loss" in r}
        assert sorted(rows) == [1, 2, 3]
        assert [rows[s]["faults/rollout_restarts"] for s in (1, 2, 3)] == [0.0, 1.0, 2.0]
        # step 2 sampled on a restarted engine 0 that had been given step 1's weights
        for s in (1, 2, 3):
            assert rows[s]["rollout/logprob_diff"] < PARITY, (s, rows[s]["rollout/logprob_diff"])
        pids = [p["pid"] for p in trainer.rollout.group.ping()]
        assert pids[0] != first_pids[0] and pids[1] != first_pids[1]

        # After the run both restarted engines hold the policy's current weights, not the checkpoint's.
        prompts = run.train.next_batch()
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
        outputs = trainer.rollout.generate(prompts.token_ids, sampling, n=2, seed=7)
        batch = build_rollout_batch(prompts, outputs, pad_id=run.tokenizer.pad_token_id)
        assert all(len(gens) == 2 for gens in outputs)
        trainer_logprobs = trainer.policy.call(PolicyWorker.compute_logprobs, batch)
        assert masked_max(batch.rollout_logprobs - trainer_logprobs, batch.response_mask) < PARITY
        with torch.no_grad():
            initial, _ = response_logprobs(load_causal_lm(run.model_path, dtype="float32"), batch)
        moved = masked_max(batch.rollout_logprobs - initial, batch.response_mask)
        assert moved > 100 * PARITY, f"the engines still sample from the initial weights (max diff {moved:.2e})"

        # A third death is one more than rollout.max_restarts=2 allows: the run stops, naming the engine.
        ray.kill(trainer.rollout.group.actors[0], no_restart=True)
        with pytest.raises(RunStoppedError, match=r"rollout rank 0: .*rollout.max_restarts=2") as info:
            with stop_on_dead_rank(trainer.checkpoints):
                trainer.generate(prompts, step=3)
        assert info.value.checkpoint is None and "No checkpoint was written yet" in str(info.value)
    finally:
        trainer.close()


def masked_max(diff: torch.Tensor, mask: torch.Tensor) -> float:
    return float((diff.abs() * mask).max())
