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


class WeightSyncError(RLHFError):
    """Sending trainer weights into the rollout engines failed or timed out."""


class CheckpointError(RLHFError):
    """A checkpoint is missing, incomplete or cannot be written."""


class RewardError(RLHFError):
    """A reward source failed to score a batch (e.g. the remote reward server, after its retries)."""
