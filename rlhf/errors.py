"""Our own exception types: every message says what the user should change."""

from __future__ import annotations


class RLHFError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(RLHFError):
    """A config value is missing, unknown, out of range or inconsistent with another."""


class DataError(RLHFError):
    """A dataset file, row or field is missing or malformed."""


class WorkerError(RLHFError):
    """A Ray actor of some role failed; carries the actor's name and its remote traceback."""

    def __init__(self, actor: str, message: str, remote_traceback: str = ""):
        self.actor = actor
        self.remote_traceback = remote_traceback
        detail = f"\n--- traceback from {actor} ---\n{remote_traceback}" if remote_traceback else ""
        super().__init__(f"{actor}: {message}{detail}")


class WorkerDiedError(WorkerError):
    """A Ray actor's process died (killed, out of memory, crashed) instead of raising; names its role and rank."""

    def __init__(self, role: str, rank: int, message: str, remote_traceback: str = ""):
        self.role = role
        self.rank = rank
        self.reason = message
        super().__init__(f"{role} rank {rank}", message, remote_traceback)


class RunStoppedError(RLHFError):
    """A trained or scoring role lost a rank mid-run: the run stopped; its last complete checkpoint is intact."""

    def __init__(self, role: str, rank: int, reason: str, checkpoint: str | None):
        self.role = role
        self.rank = rank
        self.checkpoint = checkpoint
        if checkpoint:
            where = f"The last complete checkpoint is {checkpoint}; rerun with run.resume=auto to continue from it."
        else:
            where = "No checkpoint was written yet (set run.save_every); rerun to start over."
        super().__init__(f"{role} rank {rank}: {reason}. The run stopped and its actors were shut down. {where}")


class WeightSyncError(RLHFError):
    """Sending trainer weights into the rollout engines failed or timed out."""


class CheckpointError(RLHFError):
    """A checkpoint is missing, incomplete or cannot be written."""


class RewardError(RLHFError):
    """A reward source failed to score a batch (e.g. the remote reward server, after its retries)."""


class NonFiniteError(RLHFError):
    """Training skipped run.max_consecutive_nonfinite optimizer steps in a row for a NaN/inf loss or gradient norm."""


class RolloutMismatchError(RLHFError):
    """The rollout engine samples from another distribution than the trainer scores (algorithm.mismatch_kl_threshold)."""


class StaleSampleError(RLHFError):
    """A sample is older than run.max_staleness allows when the policy trains on it (its version tag says so)."""
