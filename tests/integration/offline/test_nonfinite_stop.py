"""A DPO run whose reference log-probabilities turn NaN stops after run.max_consecutive_nonfinite skipped steps.

The poison comes in through the data the controller sends: from step 3 on, the reference sums of
every pair are NaN (a broken reference model), so every DPO loss is NaN. Steps 1-2 train and are
checkpointed (save_every=1); steps 3-5 are skipped by the engine, write no checkpoint, and step 5
raises NonFiniteError naming the step, the loss and step_00000002, which `resume=auto` picks.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.errors import NonFiniteError
from rlhf.trainers.checkpointing import CheckpointManager, read_state
from rlhf.trainers.offline import OfflineTrainer, prepare_offline
from rlhf.utils.metrics import read_metrics

from .conftest import compose_config

pytestmark = pytest.mark.ray

GOOD_STEPS = 2
LIMIT = 3


def test_dpo_stops_after_consecutive_nonfinite_steps_and_keeps_the_last_good_checkpoint(offline_ray, tmp_path):
    cfg = compose_config(
        "dpo",
        tmp_path,
        "data.mixture=[{path:'tiny:preference_hard:train',max_rows:16}]",
        "policy.num_workers=1",
        "policy.train_batch_size=4",
        "policy.micro_batch_size=2",
        "offline.max_steps=8",
        "offline.eval_at_start=false",
        "run.eval_size=4",
        "run.save_every=1",
        "run.keep_last=3",
        f"run.max_consecutive_nonfinite={LIMIT}",
    )
    trainer = OfflineTrainer(prepare_offline(cfg))
    try:
        reference = trainer.reference
        assert reference is not None

        def broken_after_good_steps(batch):
            sums = reference(batch)
            return sums if trainer.step_done < GOOD_STEPS else torch.full_like(sums, math.nan)

        trainer.reference = broken_after_good_steps  # type: ignore[assignment]
        with pytest.raises(NonFiniteError) as raised:
            trainer.fit()
    finally:
        trainer.close()

    root = tmp_path / "checkpoints"
    last_good = root / f"step_{GOOD_STEPS:08d}"
    message = str(raised.value)
    assert f"train: {LIMIT} optimizer steps in a row were skipped because the loss was not finite" in message
    assert f"the last at step {GOOD_STEPS + LIMIT}" in message
    assert str(last_good) in message and "run.resume=auto" in message

    # no checkpoint from the skipped steps, no final model; resume=auto picks the last good state
    manager = CheckpointManager(root, keep_last=3)
    assert [p.name for p in manager.complete()] == ["step_00000001", "step_00000002"]
    assert manager.resolve_resume("auto") == last_good and read_state(last_good)["step"] == GOOD_STEPS
    assert not (tmp_path / "final").exists()

    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/nonfinite_consecutive" in r]
    assert [r["train/nonfinite_consecutive"] for r in rows] == [0, 0, 1, 2, 3]
    assert [r["train/nonfinite_total"] for r in rows] == [0, 0, 1, 2, 3]
    assert all(math.isfinite(r["dpo/loss"]) for r in rows[:GOOD_STEPS])
