"""kill -9 of a real process while it writes a checkpoint: the previous checkpoint stays usable,
resume=auto picks it, the orphaned temporary directory is ignored and later pruned; keep_last holds.

The writer is a child Python process that completes step 1, then blocks inside the write of step 2
(either while filling the payload, or after the state file with only the rename left) and is killed
with SIGKILL there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rlhf.trainers.checkpointing import STATE_FILE, CheckpointManager, read_state

WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from rlhf.trainers import checkpointing
    from rlhf.trainers.checkpointing import CheckpointManager

    root, block_at = sys.argv[1], sys.argv[2]
    manager = CheckpointManager(root, keep_last=2)
    with manager.write(1, {"step": 1}) as tmp:
        (tmp / "policy.bin").write_bytes(b"one" * 1000)

    def block(why):
        print(why, flush=True)
        time.sleep(600)

    if block_at == "rename":  # the state file is written, only the rename into place is left
        real_replace = os.replace
        def replace(src, dst):
            if Path(dst).name.startswith("step_"):
                block("BLOCKED")
            real_replace(src, dst)
        checkpointing.os.replace = replace
    with manager.write(2, {"step": 2}) as tmp:
        (tmp / "policy.bin").write_bytes(b"two" * 500)  # half of the payload
        if block_at == "payload":
            block("BLOCKED")
    """
)


@pytest.mark.parametrize("block_at", ["payload", "rename"])
def test_kill_during_write_keeps_previous_checkpoint(tmp_path, block_at):
    root = tmp_path / "checkpoints"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), block_at], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "BLOCKED", child.stderr.read()  # type: ignore[union-attr]
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    orphans = list(root.glob(f".step_00000002.tmp-{child.pid}"))
    assert len(orphans) == 1  # the half-written step 2 is still on disk, under its temporary name
    assert (orphans[0] / STATE_FILE).is_file() == (block_at == "rename")
    manager = CheckpointManager(root, keep_last=2)
    assert manager.complete() == [root / "step_00000001"]
    assert manager.resolve_resume("auto") == root / "step_00000001"
    assert read_state(root / "step_00000001") == {"step": 1}
    assert (root / "step_00000001" / "policy.bin").read_bytes() == b"one" * 1000

    # The resumed run writes steps 2..4: the dead writer's directory is pruned, the last 2 are kept.
    for step in (2, 3, 4):
        with manager.write(step, {"step": step}) as tmp:
            (tmp / "policy.bin").write_bytes(bytes([step]))
    assert [p.name for p in manager.complete()] == ["step_00000003", "step_00000004"]
    assert not list(root.glob(".step_*"))
    assert manager.resolve_resume("auto") == root / "step_00000004"


def test_resume_from_an_incomplete_directory_names_the_fix(tmp_path):
    from rlhf.errors import CheckpointError

    incomplete = tmp_path / "checkpoints" / "step_00000003"
    incomplete.mkdir(parents=True)  # no trainer_state.json: the write never finished
    with pytest.raises(CheckpointError, match="no complete checkpoint there .* use run.resume=auto"):
        CheckpointManager(tmp_path / "checkpoints", keep_last=2).resolve_resume(str(incomplete))
    assert CheckpointManager(tmp_path / "checkpoints", keep_last=2).resolve_resume("auto") is None
