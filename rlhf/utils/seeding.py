"""Seeding and RNG state capture, so a resumed run draws the same random numbers; deterministic mode."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_rng_state() -> dict[str, Any]:
    """Every RNG state of this process (saved next to a checkpoint, one file per rank)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


DETERMINISTIC_ENV = "RLHF_DETERMINISTIC"
"""Set to 1 in every process of a run.deterministic run; `rlhf.workers.group.Worker` reads it at start."""
DETERMINISTIC_KEYS = (DETERMINISTIC_ENV, "CUBLAS_WORKSPACE_CONFIG")
"""Every variable `deterministic_env` may set: the actors of a run inherit them from the driver."""


def deterministic_env(device: str) -> dict[str, str]:
    """What every process of a run.deterministic run needs in its environment before CUDA starts.

    cuBLAS picks reduction strategies per stream unless its workspace is fixed (CUBLAS_WORKSPACE_CONFIG,
    torch's "Reproducibility" notes); without it torch's deterministic mode cannot make matmuls repeatable.
    """
    env = {DETERMINISTIC_ENV: "1"}
    if device == "cuda":
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # or :16:8 (less memory, maybe slower)
    return env


def use_deterministic_algorithms(enabled: bool) -> None:
    """torch's deterministic kernels (and cuDNN's, without autotuning) in this process, or back to the defaults.

    warn_only: an op with no deterministic kernel warns (naming the op) instead of stopping the run;
    such a warning means that run is not reproducible bit for bit.
    """
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def deterministic_from_env() -> bool:
    """Switch this process to deterministic algorithms if its run asked for it (DETERMINISTIC_ENV); returns that."""
    enabled = os.environ.get(DETERMINISTIC_ENV) == "1"
    if enabled:
        use_deterministic_algorithms(True)
    return enabled


@contextmanager
def deterministic_mode(enabled: bool, device: str) -> Iterator[dict[str, str]]:
    """For one run in this (driver) process: `deterministic_env` set and deterministic algorithms on when
    `enabled`; yields the variables the run's actors need. Everything is restored on exit."""
    if not enabled:
        yield {}
        return
    env = deterministic_env(device)
    previous = {key: os.environ.get(key) for key in env}
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    os.environ.update(env)
    use_deterministic_algorithms(True)
    try:
        yield env
    finally:
        use_deterministic_algorithms(was_deterministic)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
