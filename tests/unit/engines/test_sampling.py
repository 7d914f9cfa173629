"""The HF backend's sampler (temperature, top-k, top-p, seeded exponential race), vLLM's recipe."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.config import SamplingConfig
from rlhf.engines.rollout.hf_backend import sample_next


def _sample(logits, sampling, generators):
    return sample_next(logits, sampling, generators)[0]


# Row 0: token 2 is the most likely, then 1 (probabilities 0.665, 0.245, 0.090 at temperature 1).
LOGITS = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 0.0]])


def _draws(sampling: SamplingConfig, seeds: range) -> list[list[int]]:
    return [_sample(LOGITS, sampling, [torch.Generator().manual_seed(s)] * 2).tolist() for s in seeds]


def test_temperature_zero_is_greedy():
    assert _sample(LOGITS, SamplingConfig(temperature=0.0), None).tolist() == [2, 1]


def test_top_k_one_and_tiny_top_p_are_greedy():
    for sampling in (SamplingConfig(top_k=1), SamplingConfig(top_p=1e-3)):
        assert all(draw == [2, 1] for draw in _draws(sampling, range(20)))


def test_top_k_two_never_samples_the_third_token():
    draws = [d[0] for d in _draws(SamplingConfig(top_k=2), range(200))]
    assert set(draws) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Sorted probabilities 0.665, 0.245, 0.090: p = 0.8 needs tokens 2 and 1; token 0 is cut.
    draws = [d[0] for d in _draws(SamplingConfig(top_p=0.8), range(200))]
    assert set(draws) == {1, 2}


def test_seeded_rows_are_reproducible_and_follow_the_distribution():
    sampling = SamplingConfig(temperature=1.0)
    assert _draws(sampling, range(50)) == _draws(sampling, range(50))
    counts = torch.bincount(torch.tensor([d[0] for d in _draws(sampling, range(2000))]), minlength=3).float() / 2000
    expected = LOGITS[0].softmax(-1)
    assert torch.allclose(counts, expected, atol=0.04)  # 2000 draws: std of a frequency <= 0.011


def test_logprobs_are_of_the_distribution_sampled_from():
    # temperature 0.5, top-k 2: row 0's logits 1, 2, 3 become 2, 4, 6 and token 0 is cut, so a sample
    # of token 2 has logprob 6 - log(e^4 + e^6) = -log(1 + e^-2) and one of token 1 -log(1 + e^2)
    sampling = SamplingConfig(temperature=0.5, top_k=2)
    seen = {}
    for seed in range(40):
        tokens, logprobs = sample_next(LOGITS, sampling, [torch.Generator().manual_seed(seed)] * 2)
        seen[int(tokens[0])] = float(logprobs[0])
    assert seen == {2: pytest.approx(-math.log1p(math.exp(-2))), 1: pytest.approx(-math.log1p(math.exp(2)))}
    # greedy: the model's own (untempered) logprob, as vLLM reports it
    tokens, logprobs = sample_next(LOGITS, SamplingConfig(temperature=0.0), None)
    assert tokens.tolist() == [2, 1]
    torch.testing.assert_close(logprobs, LOGITS.log_softmax(-1)[[0, 1], [2, 1]])
