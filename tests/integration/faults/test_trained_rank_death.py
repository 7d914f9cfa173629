"""A policy rank killed with SIGKILL mid-run stops the run with RunStoppedError naming the role, rank and
last checkpoint, well before any timeout; the checkpoint is intact and run.resume=auto continues from it.

The kill comes right before step 3's update is sent (checkpoints of steps 1 and 2 are on disk): rank
1 is gone when the update reaches the group, rank 0's collective fails on its lost peer, and the
group reports the dead peer, the root cause. (A timer that killed "shortly after the update started"
missed on an idle machine: the 3-step run had already finished.) cluster.collective_timeout_s is 120 s, so stopping sooner than that shows nothing waited
for a timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import psutil
import pytest

from rlhf.errors import RunStoppedError
from rlhf.trainers.checkpointing import read_state
from rlhf.trainers.prepare import prepare
from rlhf.trainers.rl import RLTrainer
from rlhf.utils.metrics import read_metrics

from .conftest import compose_config

pytestmark = [pytest.mark.ray]

logger = logging.getLogger(__name__)


class RankKillingTrainer(RLTrainer):
    """SIGKILLs policy rank 1's process just before step 3's update."""

    killed_at: float | None = None

    def update(self, batch):
        if self.step_done == 2:
            pid = self.policy.ping()[1]["pid"]
            os.kill(pid, signal.SIGKILL)
            psutil.Process(pid).wait(timeout=30)
            self.killed_at = time.monotonic()
        return super().update(batch)


def test_killed_policy_rank_stops_run_and_resume_continues(ray_cluster, tmp_path):
    out = tmp_path / "run"
    overrides = ["run.save_every=1", "run.keep_last=2", "run.deterministic=true"]
    trainer = RankKillingTrainer(prepare(compose_config(out, "run.total_steps=3", *overrides)))
    try:
        survivor = trainer.policy.ping()[0]["pid"]
        with pytest.raises(RunStoppedError) as info:
            trainer.fit()
        stopped_after = time.monotonic() - trainer.killed_at
    finally:
        trainer.close()
    assert process_exits(survivor, within_s=60), "policy rank 0 outlived the stopped run"
    error = info.value
    logger.info("stopped %.1fs after the kill: %s", stopped_after, error)
    checkpoint = out / "checkpoints" / "step_00000002"
    assert (error.role, error.rank) == ("policy", 1)
    assert error.checkpoint == str(checkpoint)
    assert "run.resume=auto" in str(error)
    assert stopped_after < 120, f"stopped {stopped_after:.0f}s after the kill: it waited for a timeout"
    # intact: step 2 complete, no temporary directory of the aborted step 3 left behind
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert read_state(checkpoint)["step"] == 2

    resumed = RLTrainer(prepare(compose_config(out, "run.total_steps=3", "run.resume=auto", *overrides)))
    try:
        resumed.fit()
    finally:
        resumed.close()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "policy/loss" in r]
    assert steps[:2] == [1, 2] and steps[-1] == 3  # step 3 is logged twice if the kill came after its metrics
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    assert (out / "final" / "model.safetensors").exists()


def process_exits(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False
