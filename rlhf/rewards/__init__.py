"""Reward functions and reward servers. Importing the package registers the built-in rewards.

Rule rewards (rlhf.rewards.rule): tiny_world, exact_match, math, format_regex; length rewards
(rlhf.rewards.length): length_penalty, overlong_penalty. RewardPipeline (rlhf.rewards.pipeline)
combines them with a reward model, a remote reward server and an LLM judge. docs/rewards.md.
"""

from rlhf.rewards import length, rule  # noqa: F401  (register the built-in rewards)
from rlhf.rewards.pipeline import RewardPipeline, build_reward_pipeline
from rlhf.rewards.registry import REWARD_FUNCTIONS, RewardFn, load_reward_fn, score

__all__ = ["REWARD_FUNCTIONS", "RewardFn", "RewardPipeline", "build_reward_pipeline", "load_reward_fn", "score"]
