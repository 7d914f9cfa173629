"""The environment API of multi-turn (agentic) rollouts, and loading environments by name or import path.

One environment instance serves one trajectory: the rollout creates it from the prompt row, calls `reset(row)`
once, then `step(action)` with each model turn's text until it answers `done` (or the turn or token limit ends
the trajectory), and `close()` at the end:

    class Calculator(Environment):
        def reset(self, row):                   # -> text appended after the prompt before the first turn ("" none)
            return ""
        def step(self, action):                 # the model turn's text (its stop string included)
            expression = parse_call(action)
            if expression is None:              # no tool call: the model answered
                return StepResult("", done=True)
            return StepResult(f"={evaluate(expression)}\\n", reward=0.0)

`reset` and `step` may be `async def` (each trajectory's calls run in a worker thread, which runs a coroutine to
completion). The observation is text: the rollout renders it once into token ids and appends them to the
trajectory; nothing already sampled is ever re-tokenized (rlhf.environments.trajectory). Per-turn rewards are
summed into the trajectory's score next to the reward pipeline's terms on the final text.

A config names an environment as a registered name (ENVIRONMENTS) or "pkg.module:Class" plus keyword arguments;
`load_environment` checks both at start-up, before any cluster work, with a ConfigError naming the field, and
`check_environment` runs a dry `reset` on a real prompt row.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlhf.algorithms.registry import Registry
from rlhf.errors import ConfigError, RLHFError


@dataclass
class StepResult:
    """What an environment answers to one model turn."""

    observation: str = ""
    """Text the rollout appends after the turn (as the environment's turn); "" appends nothing."""
    reward: float = 0.0
    """This turn's reward (summed over the trajectory into its score)."""
    done: bool = False
    """The trajectory ends here (the model answered, or the environment gave up on it)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Counters the rollout reports: "tool_calls", "tool_errors" (ints; missing means 0)."""


class Environment:
    """Base class of environments (any class with these methods works; subclassing documents the contract)."""

    stop: tuple[str, ...] = ()
    """Strings that end a model turn (a tool call's closing tag): the rollout adds them to its stop strings."""

    def reset(self, row: dict[str, Any]) -> str:
        """Start a trajectory for the prompt row (its fields: "prompt", "answer", ... as the dataset gave them);
        return text to append after the prompt before the model's first turn ("" for none)."""
        return ""

    def step(self, action: str) -> StepResult:
        """React to one model turn (its decoded text, the stop string included)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the trajectory held (processes, files); called once, also after errors."""


ENVIRONMENTS: Registry[Callable[..., Environment]] = Registry("environment")
"""Built-in environments by name (rlhf.environments registers them)."""


def load_environment(name_or_import_path: str, kwargs: dict[str, Any], *, field_name: str) -> Callable[[], Any]:
    """A factory of environments: the registered class `name_or_import_path` or "pkg.module:Class", with `kwargs`.

    Checks, so that a bad config fails before Ray starts: the name resolves (ConfigError lists the known ones),
    it is callable, one instance is built with the kwargs, and the instance has callable `reset` and `step`.
    """
    if ":" in name_or_import_path:
        cls = _import(name_or_import_path, field_name)
    else:
        try:
            cls = ENVIRONMENTS.get(name_or_import_path)
        except ConfigError as error:
            raise ConfigError(f"{field_name}: {error}") from None
    if not callable(cls):
        raise ConfigError(f"{field_name}={name_or_import_path!r} is not a class or factory (got {type(cls).__name__})")
    try:
        probe = cls(**kwargs)
    except TypeError as error:
        raise ConfigError(
            f"{field_name}={name_or_import_path!r} cannot be built with {field_name}_kwargs {kwargs}: {error}"
        ) from None
    try:
        for method in ("reset", "step"):
            if not callable(getattr(probe, method, None)):
                raise ConfigError(
                    f"{field_name}={name_or_import_path!r} has no {method}() method: an environment needs "
                    "reset(row) -> str and step(action) -> StepResult (rlhf.environments.Environment)"
                )
    finally:
        close_quietly(probe)
    return lambda: cls(**kwargs)


def check_environment(factory: Callable[[], Any], row: dict[str, Any], *, field_name: str, where: str) -> None:
    """A dry `reset` on a real prompt row (`where` names it): it must return text. ConfigError otherwise."""
    env = factory()
    try:
        observation = call(env.reset, row)
    except RLHFError:
        raise
    except Exception as error:
        raise ConfigError(f"{field_name}: reset() fails on {where}: {type(error).__name__}: {error}") from error
    finally:
        close_quietly(env)
    if not isinstance(observation, str):
        raise ConfigError(
            f'{field_name}: reset() must return the text to append before the first turn (a str, "" for none); '
            f"on {where} it returned {type(observation).__name__}"
        )


def call(method: Callable[..., Any], *args: Any) -> Any:
    """`method(*args)`, run to completion if it is a coroutine function (async environments)."""
    result = method(*args)
    if inspect.isawaitable(result):
        return asyncio.run(_awaited(result))
    return result


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def close_quietly(env: Any) -> None:
    close = getattr(env, "close", None)
    if callable(close):
        try:
            call(close)
        except Exception:  # noqa: BLE001 - a failing close must not hide the trajectory's result
            pass


def _import(path: str, field_name: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{field_name}={path!r}: cannot import {module_name!r} ({error})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{field_name}={path!r}: module {module_name!r} has no attribute {attr!r}") from None
