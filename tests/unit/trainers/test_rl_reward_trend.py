"""Which reward the RL loop's closing trend line follows (rlhf.trainers.rl.reward_trend_key)."""

import dataclasses

from rlhf.config import RewardConfig, RewardNormConfig, RLHFConfig
from rlhf.trainers.rl import reward_trend_key
from rlhf.utils.metrics import reward_trend


def test_whitened_reward_model_scores_are_followed_by_their_raw_mean():
    cfg = RLHFConfig()
    assert reward_trend_key(cfg) == "reward/mean"  # rule reward only
    with_rm = dataclasses.replace(cfg, reward=RewardConfig(model_path="/rm", model_norm=RewardNormConfig(mode="batch")))
    assert reward_trend_key(with_rm) == "reward/model_raw_mean"
    raw_rm = dataclasses.replace(cfg, reward=RewardConfig(model_path="/rm"))  # not normalised: the total moves
    assert reward_trend_key(raw_rm) == "reward/mean"


def test_trend_needs_two_windows():
    assert reward_trend([1.0] * 19) is None
    assert reward_trend([0.0] * 10 + [1.0] * 10) == (0.0, 1.0)
    assert reward_trend([0, 1, 2, 3], window=2) == (0.5, 2.5)
