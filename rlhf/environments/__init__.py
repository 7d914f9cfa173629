"""Environments of multi-turn (agentic) rollouts: the API, the built-in tools, and the rollout loop.

    from rlhf.environments import Environment, StepResult, ENVIRONMENTS

See rlhf.environments.base for the contract, rlhf.environments.loop for how trajectories advance, and
rlhf.environments.trajectory for the token-in-token-out rule.
"""

from rlhf.environments.base import (
    ENVIRONMENTS,
    Environment,
    StepResult,
    check_environment,
    load_environment,
)
from rlhf.environments.calculator import CalculatorEnv, CalculatorError, evaluate
from rlhf.environments.loop import AgentLimits, run_trajectories
from rlhf.environments.python_tool import PythonEnv
from rlhf.environments.sandbox import SandboxLimits, SandboxResult, run_python
from rlhf.environments.trajectory import ObservationRenderer, Trajectory

__all__ = [
    "ENVIRONMENTS",
    "AgentLimits",
    "CalculatorEnv",
    "CalculatorError",
    "Environment",
    "ObservationRenderer",
    "PythonEnv",
    "SandboxLimits",
    "SandboxResult",
    "StepResult",
    "Trajectory",
    "check_environment",
    "evaluate",
    "load_environment",
    "run_python",
    "run_trajectories",
]
