"""Reward functions and reward servers. Importing the package registers the built-in rule rewards."""

from rlhf.rewards import rule  # noqa: F401  (registers tiny_world, exact_match, math, format_regex)
from rlhf.rewards.registry import REWARD_FUNCTIONS, RewardFn, load_reward_fn, score

__all__ = ["REWARD_FUNCTIONS", "RewardFn", "load_reward_fn", "score"]
