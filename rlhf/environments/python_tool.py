"""The Python tool: the policy writes `<python>CODE</python>`, the sandbox runs it, its output is the observation.

The rollout stops a turn at "</python>"; the code runs in rlhf.environments.sandbox (a separate process with
CPU, memory, output and wall-clock limits, in its own scratch directory, without network or new processes), and
its stdout, or the error, comes back as the environment's turn. A turn without a call is the answer.
"""

from __future__ import annotations

import re
from typing import Any

from rlhf.environments.base import ENVIRONMENTS, Environment, StepResult
from rlhf.environments.sandbox import SandboxLimits, run_python

CALL = re.compile(r"<python>(.*?)</python>", re.DOTALL)
CALL_END = "</python>"
"""The stop string that ends a turn with a tool call (rollout.sampling.stop needs it)."""


@ENVIRONMENTS.register("python")
class PythonEnv(Environment):
    """Runs each `<python>CODE</python>` call in the sandbox; answers with its stdout (stripped), or with
    "error: ..." (the exception's last line, the limit hit, what the sandbox refused). Counts tool calls, errors,
    limits hit ("tool_timeouts" for CPU and wall-clock time, "tool_killed" for any limit) and refusals."""

    stop = (CALL_END,)

    def __init__(
        self, cpu_seconds: int = 5, wall_seconds: float = 10.0, memory_mb: int = 512, output_bytes: int = 4096
    ):
        self.limits = SandboxLimits(
            cpu_seconds=cpu_seconds, wall_seconds=wall_seconds, memory_mb=memory_mb, output_bytes=output_bytes
        )

    def reset(self, row: dict[str, Any]) -> str:
        return ""

    def step(self, action: str) -> StepResult:
        calls = CALL.findall(action)
        if not calls:
            return StepResult(done=True)
        result = run_python(calls[-1], self.limits)
        info = {
            "tool_calls": 1,
            "tool_errors": int(not result.ok),
            "tool_timeouts": int(result.killed in ("cpu", "wall")),
            "tool_killed": int(result.killed is not None),
            "tool_refused": len(result.refused),
        }
        if result.ok:
            return StepResult(result.stdout.strip(), info=info)
        if result.killed is not None:
            reason = f"{result.killed} limit reached"
        elif result.refused:
            reason = f"not allowed: {result.refused[0]}"
        else:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit status {result.exit_code}"
        return StepResult(f"error: {reason}", info=info)
