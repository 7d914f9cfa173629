"""CheckpointManager.save / restore: the state file's contents, the returned directory, resume choices.

No role groups here (the roles' DeepSpeed state is covered by the resume tests of tests/integration and
tests/e2e); a None group is how a controller without that role (RL without a critic) passes it.
"""

from __future__ import annotations

import json

import pytest

from rlhf.errors import CheckpointError
from rlhf.trainers.checkpointing import STATE_FILE, CheckpointManager


def test_save_writes_the_step_into_the_state_and_returns_the_renamed_directory(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    saved = manager.save(3, {"data_stream": {"epoch": 1}}, {"policy": None})
    assert saved == tmp_path / "checkpoints" / "step_00000003" and saved.is_dir()  # not the temporary name
    assert json.loads((saved / STATE_FILE).read_text()) == {"step": 3, "data_stream": {"epoch": 1}}
    assert not list((tmp_path / "checkpoints").glob(".step_*"))


def test_restore_returns_the_newest_state_after_the_check_and_none_without_a_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    assert manager.restore("auto", {}) is None
    for step in (1, 2, 3):
        manager.save(step, {"kl_coef": step / 10}, {})
    assert [p.name for p in manager.complete()] == ["step_00000002", "step_00000003"]  # keep_last=2
    seen = []
    state = manager.restore("auto", {"critic": None}, check=lambda path, s: seen.append((path.name, s["step"])))
    assert state == {"step": 3, "kl_coef": 0.3} and seen == [("step_00000003", 3)]
    assert manager.restore("none", {}) is None
    assert manager.restore(str(tmp_path / "checkpoints" / "step_00000002"), {})["step"] == 2


def test_a_failing_check_stops_restore(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=1)
    manager.save(1, {}, {})

    def refuse(path, state):
        raise CheckpointError(f"{path.name} was written by another run")

    with pytest.raises(CheckpointError, match="step_00000001 was written by another run"):
        manager.restore("auto", {}, check=refuse)


def test_the_controllers_own_files_are_part_of_the_atomic_checkpoint(tmp_path):
    """`files` (an off-policy run's rollout buffer) is written into the checkpoint before it is renamed into
    place; a writer that fails leaves no checkpoint at all."""
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    saved = manager.save(1, {}, {}, files=lambda directory: (directory / "rollout_buffer.pt").write_text("batch"))
    assert (saved / "rollout_buffer.pt").read_text() == "batch" and (saved / STATE_FILE).is_file()

    def broken(directory):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        manager.save(2, {}, {}, files=broken)
    assert manager.latest() == saved and not list((tmp_path / "checkpoints").glob(".step_*"))
