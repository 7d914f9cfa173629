"""The controller's non-finite rule: no checkpoint inside a run of skipped steps, a clear stop at the limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.errors import NonFiniteError
from rlhf.trainers.nonfinite import NonFiniteGuard, combine


def update(role: str, consecutive: int, total: int, *, loss: bool = True, skipped: int = 1) -> dict[str, float]:
    return {
        f"{role}/nonfinite_skipped": float(skipped),
        f"{role}/nonfinite_consecutive": float(consecutive),
        f"{role}/nonfinite_total": float(total),
        f"{role}/nonfinite_loss": float(loss),
    }


def test_finite_steps_may_be_checkpointed():
    assert NonFiniteGuard(3).check(1, {**update("policy", 0, 2, skipped=0), "reward/mean": 0.5}, None)
    assert NonFiniteGuard(3).check(1, {"reward/mean": 0.5}, None)  # a step without an update


def test_a_streak_below_the_limit_blocks_checkpoints_only():
    metrics = {**update("policy", 0, 0, skipped=0), **update("critic", 2, 2)}
    assert NonFiniteGuard(3).check(7, metrics, Path("ckpt")) is False


def test_the_limit_stops_with_step_metric_and_last_good_checkpoint():
    last_good = Path("/runs/a/checkpoints/step_00000004")
    with pytest.raises(NonFiniteError) as raised:
        NonFiniteGuard(3).check(7, update("critic", 3, 5, loss=False), last_good)
    message = str(raised.value)
    assert message.startswith("critic: 3 optimizer steps in a row were skipped because the gradient norm")
    assert "(critic/grad_norm)" in message and "the last at step 7; 5 skipped in all" in message
    assert f"the last good checkpoint is {last_good} (run.resume=auto" in message
    assert "critic.optim.lr" in message


def test_without_a_checkpoint_the_message_says_so():
    with pytest.raises(NonFiniteError, match="because the loss was not finite.*no checkpoint was written"):
        NonFiniteGuard(2).check(2, update("policy", 2, 2), None)


def test_limit_zero_never_stops():
    assert NonFiniteGuard(0).check(99, update("policy", 50, 50), None) is False


def test_combine_sums_skips_and_keeps_the_last_streak():
    merged = combine([update("train", 1, 1), update("train", 0, 1, skipped=0), update("train", 1, 2)])
    assert merged == update("train", 1, 2, skipped=2)
