"""Rollout backends behind one interface (see `base`); pick one by name from ROLLOUT_BACKENDS.

Importing this package does not import vLLM: the vLLM backend imports it when it is built,
after setting the environment it needs.
"""

from rlhf.engines.rollout import hf_backend, vllm_backend  # noqa: F401  (register the backends)
from rlhf.engines.rollout.base import (
    FINISH_REASONS,
    ROLLOUT_BACKENDS,
    SLEEP_TAGS,
    Generation,
    RolloutBackend,
    logprob_temperature,
)

__all__ = ["FINISH_REASONS", "ROLLOUT_BACKENDS", "SLEEP_TAGS", "Generation", "RolloutBackend", "logprob_temperature"]
