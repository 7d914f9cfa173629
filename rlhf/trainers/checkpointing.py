"""Run-level checkpoints: one directory per step, written under a temporary name and renamed.

A kill -9 during a write leaves only a `.tmp` directory behind, which `latest()` ignores, so
the previous checkpoint stays usable and `resume=auto` picks it. A controller's checkpoint is
`save` (its state, and each trained role's DeepSpeed state in <checkpoint>/<role>/) and `restore`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from rlhf.errors import CheckpointError
from rlhf.workers.group import WorkerGroup, wait_all
from rlhf.workers.trainable import TrainableWorker

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
Roles = Mapping[str, Optional[WorkerGroup]]
"""Trained role groups by the name of their directory in a checkpoint; a None group is skipped."""
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointManager:
    def __init__(self, root: str | Path, *, keep_last: int):
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def resolve_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from: auto → newest complete one (or None), none → None."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(
                f"run.resume={resume}: no complete checkpoint there (missing {STATE_FILE}); "
                f"use run.resume=auto or point at a step_XXXXXXXX directory under {self.root}"
            )
        return path

    @contextmanager
    def write(self, step: int, state: dict[str, Any]) -> Iterator[Path]:
        """Yield a temporary directory to fill; on success write the state file and rename it into place."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".step_{step:08d}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            write_json_atomic(tmp / STATE_FILE, state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("checkpoint written: %s", final)
        self._prune()

    def save(
        self, step: int, state: dict[str, Any], roles: Roles, *, files: Optional[Callable[[Path], None]] = None
    ) -> Path:
        """Checkpoint `step`: {"step": step, **state} in the state file and every role's DeepSpeed state
        (model, optimizer, scheduler, RNG: `TrainableWorker.save_checkpoint`) in <checkpoint>/<role>/;
        the roles write at the same time. `files(directory)` writes the controller's own files (a rollout
        buffer) into the checkpoint before it is renamed into place. Returns the checkpoint's directory."""
        with self.write(step, {"step": step, **state}) as tmp:
            _each_role(roles, TrainableWorker.save_checkpoint, tmp)
            if files is not None:
                files(tmp)
        return self.root / f"step_{step:08d}"

    def restore(
        self, resume: str, roles: Roles, *, check: Optional[Callable[[Path, dict[str, Any]], None]] = None
    ) -> dict[str, Any] | None:
        """Load the checkpoint `resume` names (`resolve_resume`) into every role and return its state,
        or None when there is none. `check(checkpoint, state)` runs before any role loads (it raises
        CheckpointError for a checkpoint this run cannot continue)."""
        checkpoint = self.resolve_resume(resume)
        if checkpoint is None:
            return None
        state = read_state(checkpoint)
        if check is not None:
            check(checkpoint, state)
        logger.info("resuming from %s (step %d)", checkpoint, state["step"])
        _each_role(roles, TrainableWorker.load_checkpoint, checkpoint)
        return state

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step_*.tmp-*"):
            if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
                shutil.rmtree(stale, ignore_errors=True)


def _each_role(roles: Roles, method: Callable[..., Any], checkpoint: Path) -> None:
    """`method(<checkpoint>/<role>)` on every rank of every role, awaited together."""
    calls = [(group, group.run(method, str(checkpoint / name))) for name, group in roles.items() if group is not None]
    if calls:
        wait_all(calls)


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
