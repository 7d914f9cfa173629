"""Entropy and log-probabilities from logits: stability and agreement with torch references."""

import math

import torch

from rlhf.algorithms import entropy as entropy_module
from rlhf.algorithms.entropy import entropy_from_logits, logprobs_from_logits


def test_entropy_of_uniform_is_log_vocab():
    # 4 equal logits: H = ln 4 = 1.3863
    assert math.isclose(entropy_from_logits(torch.zeros(4)).item(), math.log(4), rel_tol=1e-6)


def test_entropy_is_stable_for_extreme_logits():
    # a near one-hot distribution: entropy ~0 and finite (no log(0) = -inf times 0)
    logits = torch.tensor([[1e4, -1e4, 0.0], [float("-inf"), 0.0, 0.0]])
    entropies = entropy_from_logits(logits)
    assert torch.isfinite(entropies[0]) and entropies[0].item() < 1e-6
    # the -inf logit has probability 0: entropy of the remaining two equal logits is ln 2
    assert math.isclose(entropies[1].item(), math.log(2), rel_tol=1e-6)


def test_entropy_matches_categorical():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)


def test_logprobs_match_log_softmax_gather():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7) * 3
    labels = torch.randint(0, 7, (2, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)


def test_low_precision_logits_are_upcast_chunk_by_chunk(monkeypatch):
    monkeypatch.setattr(entropy_module, "ROWS_PER_CHUNK", 3)  # 10 rows -> 4 chunks
    torch.manual_seed(2)
    logits = (torch.randn(2, 5, 13) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 13, (2, 5))
    reference = logits.float()
    logprobs = logprobs_from_logits(logits, labels)
    assert logprobs.dtype == torch.float32 and logprobs.shape == (2, 5)
    torch.testing.assert_close(logprobs, torch.log_softmax(reference, -1).gather(-1, labels[..., None]).squeeze(-1))
    torch.testing.assert_close(entropy_from_logits(logits), entropy_from_logits(reference))


def test_gradients_flow_through_logprobs():
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[0, 2]])).sum().backward()
    # d log softmax_y / d z_v = [v == y] - 1/3
    expected = torch.tensor([[[2 / 3, -1 / 3, -1 / 3], [-1 / 3, -1 / 3, 2 / 3]]])
    torch.testing.assert_close(logits.grad, expected)
