"""Reward functions by name: the registry, the batched signature, and loading with arguments.

Every reward function, built in or a user plugin, has one batched signature:

    fn(prompts: list[str], responses: list[str], metadata: list[dict], /, **hyperparameters) -> list[float]

one finite float per response, and `[]` for an empty batch. `prompts[i]` is the policy's rendered
prompt; `metadata[i]` holds the prompt row's other fields (the reference answer is
metadata[i]["answer"], see rlhf.data.prompts) and "raw_prompt" (the prompt as the dataset wrote it), plus
"prompt_text" and "response_length" (response tokens) added by the trainer and rlhf.rewards.pipeline. Hyperparameters are keyword-only arguments with defaults,
or without a default when the user must give them (format_regex's `pattern`); a keyword-only
`max_response_length` is filled from rollout.sampling.max_new_tokens. `load_reward_fn` binds them
with functools.partial, so a config names a function and its arguments (reward.fn + reward.kwargs,
or reward.components), and the pipeline calls the result with the batch alone.

A plugin is any importable callable named "pkg.module:function". At start-up, before Ray, it is
imported and checked: it must be callable, take three positional arguments, accept the given
kwargs, and return [] for an empty batch; a failure is a ConfigError naming the config field.
See docs/rewards.md.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from rlhf.algorithms.registry import Registry
from rlhf.errors import ConfigError, RLHFError

logger = logging.getLogger(__name__)


class RewardFn(Protocol):
    """A batched reward: one float per (prompt, response, metadata) row; must accept an empty batch."""

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], /) -> list[float]: ...


REWARD_FUNCTIONS: Registry[Callable[..., list[float]]] = Registry("reward function")


def load_reward_fn(name_or_import_path: str, **kwargs: Any) -> RewardFn:
    """A registered reward function by name, or a plugin by "pkg.module:function", with `kwargs` bound.

    Checks, so that a bad reward config fails at validation rather than mid-run: the name is
    registered (ConfigError lists the known ones) or the import path resolves to a callable; the
    kwargs are all accepted and every required hyperparameter is given; and the bound function
    runs on an empty batch and returns an empty list (which, e.g., compiles format_regex's pattern).
    """
    if ":" in name_or_import_path:
        fn = _import_callable(name_or_import_path)
    else:
        fn = REWARD_FUNCTIONS.get(name_or_import_path)
    _check_arguments(fn, name_or_import_path, kwargs)
    bound = functools.partial(fn, **kwargs) if kwargs else fn
    try:
        result = bound([], [], [])
    except RLHFError:
        raise
    except Exception as e:
        raise ConfigError(
            f"reward function {name_or_import_path!r} with arguments {kwargs} fails on an empty batch: {e!r}"
        ) from e
    if not isinstance(result, Sequence) or len(result) != 0:
        raise ConfigError(
            f"reward function {name_or_import_path!r} must return a list of floats, one per response; for an empty batch it returned {result!r}"
        )
    return bound


def score(
    fn: RewardFn, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], *, name: str = "reward"
) -> list[float]:
    """Call `fn` on a batch and check it returned one finite float per response."""
    if not len(prompts) == len(responses) == len(metadata):
        raise ValueError(
            f"batch sizes differ: {len(prompts)} prompts, {len(responses)} responses, {len(metadata)} metadata rows"
        )
    rewards = fn(prompts, responses, metadata)
    if len(rewards) != len(responses):
        raise RLHFError(
            f"{name} returned {len(rewards)} rewards for {len(responses)} responses; return one float per response"
        )
    out = [float(r) for r in rewards]
    bad = [i for i, r in enumerate(out) if not math.isfinite(r)]
    if bad:
        raise RLHFError(
            f"{name} returned non-finite rewards at rows {bad[:5]} (e.g. {out[bad[0]]}); return finite floats"
        )
    return out


def _import_callable(path: str) -> Callable[..., list[float]]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"reward import path {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"cannot import module {module_name!r} for reward {path!r}: {e}; check the name and that it is on PYTHONPATH"
        ) from e
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(
            f"module {module_name!r} has no attribute {attr!r}; its callables: {', '.join(public) or 'none'}"
        )
    if not callable(fn):
        raise ConfigError(f"reward {path!r} is a {type(fn).__name__}, not a function")
    return fn


def _check_arguments(fn: Callable[..., Any], name: str, kwargs: dict[str, Any]) -> None:
    parameters = list(inspect.signature(fn).parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in parameters)
    if len(positional) < 3 and not has_varargs:
        raise ConfigError(
            f"reward function {name!r} must take (prompts, responses, metadata) positionally; it takes {[p.name for p in parameters]}"
        )
    hyper = {p.name: p for p in positional[3:] + [p for p in parameters if p.kind == p.KEYWORD_ONLY]}
    if not any(p.kind == p.VAR_KEYWORD for p in parameters):
        unknown = sorted(set(kwargs) - set(hyper))
        if unknown:
            raise ConfigError(
                f"reward function {name!r} got unknown argument(s) {', '.join(unknown)}; it accepts: {', '.join(hyper) or 'none'}"
            )
    missing = [n for n, p in hyper.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise ConfigError(
            f"reward function {name!r} needs argument(s) {', '.join(missing)}; pass them with the reward's kwargs"
        )
