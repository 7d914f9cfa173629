"""The multi-turn rollout: trajectories of one batch advance turn by turn, interleaved, until each one ends.

    trajectories = run_trajectories(rows, prompt_ids, n, generate=..., make_env=..., render=..., decode=..., limits=...)

Every trajectory that waits for the model is sampled in one engine call (`generate(contexts, seed)`: one sample
per context), then each environment call runs in a thread of its own. The loop goes on with whichever trajectories
got their observation back while slower environments keep working, so a slow tool delays only its own
trajectory; a call past `limits.step_timeout_s` ends that turn with an error observation (counted as
"tool_timeouts") and its thread is left to finish on its own (a daemon: it never holds the process), so the
environment may get its next step while that call still runs. An environment that raises ends its trajectory
("error", counted as "env_errors"); the others go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, Optional

from rlhf.environments.base import StepResult, call, close_quietly
from rlhf.environments.trajectory import Trajectory

logger = logging.getLogger(__name__)

TIMEOUT_OBSERVATION = "error: the tool took longer than {seconds:g} s and was stopped"


@dataclass
class AgentLimits:
    max_turns: int
    """Model turns per trajectory."""
    max_tokens: int
    """Response tokens per trajectory (model and environment); the excess of the last turn is cut."""
    step_timeout_s: float
    """Seconds an environment's reset or step may take."""


Generate = Callable[[list[list[int]], Optional[int]], Sequence[Any]]
"""(contexts, seed) -> one Generation (token_ids, logprobs) per context."""


def run_trajectories(
    rows: Sequence[dict[str, Any]],
    prompt_ids: Sequence[list[int]],
    n: int,
    *,
    generate: Generate,
    make_env: Callable[[], Any],
    render: Callable[[str, Optional[int]], list[int]],
    decode: Callable[[list[int]], str],
    limits: AgentLimits,
    seed: Optional[int] = None,
) -> list[Trajectory]:
    """`n` trajectories per prompt, prompt-major (trajectory j of prompt i is i * n + j), each with its own
    environment (reset with its prompt row)."""
    trajectories = [Trajectory(list(prompt_ids[i]), dict(rows[i])) for i in range(len(rows)) for _ in range(n)]
    envs = [make_env() for _ in trajectories]
    try:
        _Loop(trajectories, envs, generate, render, decode, limits, seed).run()
    finally:
        for env in envs:
            close_quietly(env)
    return trajectories


def in_thread(method: Callable[..., Any], *args: Any) -> Future:
    """`call(method, *args)` in a daemon thread of its own; its Future answers when it returns or raises."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(call(method, *args))
        except BaseException as error:  # noqa: BLE001 - handed to the loop through the future
            future.set_exception(error)

    threading.Thread(target=target, name="environment", daemon=True).start()
    return future


class _Loop:
    def __init__(self, trajectories, envs, generate, render, decode, limits, seed) -> None:
        self.trajectories, self.envs = trajectories, envs
        self.generate, self.render, self.decode, self.limits = generate, render, decode, limits
        self.seed = seed
        self.round = 0
        self.pending: dict[Future, tuple[int, float, str]] = {}
        """Environment calls in flight: future -> (trajectory, deadline, "reset" or "step")."""

    def run(self) -> None:
        for k, (trajectory, env) in enumerate(zip(self.trajectories, self.envs)):
            self._submit(k, "reset", env.reset, trajectory.row)
        ready: list[int] = []
        while self.pending or ready:
            if ready:
                self._sample(ready)
            ready = self._collect()

    def _submit(self, k: int, kind: str, method: Callable[..., Any], argument: Any) -> None:
        future = in_thread(method, argument)
        self.pending[future] = (k, time.monotonic() + self.limits.step_timeout_s, kind)

    def _sample(self, ready: list[int]) -> None:
        """One model turn for every trajectory in `ready` (one engine call); their environment steps start."""
        seed = None if self.seed is None else self.seed + self.round * 1_000_003
        self.round += 1
        outputs = self.generate([self.trajectories[k].context() for k in ready], seed)
        for k, generation in zip(ready, outputs):
            trajectory = self.trajectories[k]
            trajectory.add_model_turn(list(generation.token_ids), list(generation.logprobs))
            if trajectory.truncate(self.limits.max_tokens):
                trajectory.end = "max_tokens"
            elif trajectory.turns >= self.limits.max_turns:
                # the environment still judges the last turn (its reward), but no observation follows
                self._submit(k, "last", self.envs[k].step, self.decode(list(generation.token_ids)))
            else:
                self._submit(k, "step", self.envs[k].step, self.decode(list(generation.token_ids)))

    def _collect(self) -> list[int]:
        """Environment answers: every one already in, waiting for at least one (or the first deadline).
        Returns the trajectories that wait for the model now."""
        if not self.pending:
            return []
        timeout = max(0.0, min(deadline for _, deadline, _ in self.pending.values()) - time.monotonic())
        done, _ = wait(list(self.pending), timeout=timeout, return_when=FIRST_COMPLETED)
        ready = []
        for future in done:
            k, _, kind = self.pending.pop(future)
            if self._answered(k, kind, future):
                ready.append(k)
        now = time.monotonic()
        for future, (k, deadline, kind) in list(self.pending.items()):
            if deadline <= now:  # past its time: the turn ends with an error, the thread finishes on its own
                del self.pending[future]
                if self._timed_out(k, kind):
                    ready.append(k)
        return sorted(ready)

    def _answered(self, k: int, kind: str, future: Future) -> bool:
        trajectory = self.trajectories[k]
        try:
            answer = future.result()
        except Exception as error:  # noqa: BLE001 - the environment's bug ends this trajectory only
            logger.warning("environment %s failed on trajectory %d: %r", kind, k, error)
            trajectory.counters["env_errors"] += 1
            trajectory.end = "error"
            return False
        if kind == "reset":
            return self._observe(trajectory, answer if isinstance(answer, str) else "")
        result = answer if isinstance(answer, StepResult) else StepResult(**answer)
        trajectory.turn_rewards.append(float(result.reward))
        trajectory.counters.update({key: int(v) for key, v in result.info.items() if isinstance(v, (int, float))})
        if result.done:
            trajectory.end = "done"
            return False
        if kind == "last":
            trajectory.end = "max_turns"
            return False
        return self._observe(trajectory, result.observation)

    def _timed_out(self, k: int, kind: str) -> bool:
        trajectory = self.trajectories[k]
        trajectory.counters["tool_timeouts"] += 1
        if kind == "reset":
            trajectory.end = "error"
            return False
        trajectory.turn_rewards.append(0.0)
        if kind == "last":
            trajectory.end = "max_turns"
            return False
        return self._observe(trajectory, TIMEOUT_OBSERVATION.format(seconds=self.limits.step_timeout_s))

    def _observe(self, trajectory: Trajectory, observation: str) -> bool:
        """Append the observation's ids; True if the trajectory waits for the model now."""
        trajectory.add_observation(self.render(observation, trajectory.last_token))
        if trajectory.truncate(self.limits.max_tokens) or len(trajectory.response_ids) >= self.limits.max_tokens:
            trajectory.end = "max_tokens"
            return False
        return True
