"""Reward-model score normalisation: batch and running whitening, clipping, state."""

import pytest
import torch

from rlhf.errors import ConfigError
from rlhf.rewards.normalize import RewardNormalizer


def test_batch_whitening():
    # mean 2, population variance 2/3: (x - 2) / sqrt(2/3) = ±1.2247
    got = RewardNormalizer("batch", eps=0.0)(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(got, torch.tensor([-1.224745, 0.0, 1.224745]))


def test_running_whitening_uses_all_scores_seen_so_far():
    norm = RewardNormalizer("running", eps=0.0)
    # first batch [1, 3]: mean 2, variance 1 -> [-1, 1]
    torch.testing.assert_close(norm(torch.tensor([1.0, 3.0])), torch.tensor([-1.0, 1.0]))
    # then [5]: all seen [1, 3, 5], mean 3, variance 8/3 -> (5 - 3) / sqrt(8/3) = 1.2247
    torch.testing.assert_close(norm(torch.tensor([5.0])), torch.tensor([1.224745]))
    assert (norm.count, norm.mean, norm.var) == (3, pytest.approx(3.0), pytest.approx(8 / 3))
    restored = RewardNormalizer("running")
    restored.load_state_dict(norm.state_dict())
    assert restored.state_dict() == norm.state_dict()


def test_running_moments_do_not_depend_on_batching():
    scores = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3 + 1
    one, many = RewardNormalizer("running"), RewardNormalizer("running")
    one.update(scores)
    for chunk in scores.split(7):
        many.update(chunk)
    assert many.mean == pytest.approx(one.mean) and many.var == pytest.approx(one.var)
    assert one.var == pytest.approx(float(scores.double().var(unbiased=False)))


def test_clip_and_none():
    got = RewardNormalizer("none", clip=0.5)(torch.tensor([-2.0, 0.2, 3.0]))
    torch.testing.assert_close(got, torch.tensor([-0.5, 0.2, 0.5]))


def test_unknown_mode():
    with pytest.raises(ConfigError, match="not one of none, running, batch"):
        RewardNormalizer("whiten")
