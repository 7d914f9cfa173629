"""SFT loss: hand value, agreement with cross-entropy on shifted logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.algorithms.sft import IGNORE_INDEX, sft_loss, sft_loss_from_logits


def test_sft_loss_hand_computed():
    # NLLs of real tokens: ln 2, ln 4 (row 0) and ln 2 (row 1); token_mean = (ln2 + 2 ln2 + ln2) / 3 = 4/3 ln 2
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 1e-9], [0.5, 1e-9, 1e-9]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = sft_loss(logprobs, mask)
    assert loss.item() == pytest.approx(4 / 3 * math.log(2), rel=1e-6)
    assert stats["sft/tokens"].item() == 3
    # seq_mean_token_mean: row means 1.5 ln 2 and ln 2 -> 1.25 ln 2
    loss, stats = sft_loss(logprobs, mask, agg="seq_mean_token_mean")
    assert loss.item() == pytest.approx(1.25 * math.log(2), rel=1e-6)
    assert stats["sft/nll"].item() == pytest.approx(4 / 3 * math.log(2), rel=1e-6)


def test_from_logits_matches_shifted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, 4:] = IGNORE_INDEX  # padding
    loss, stats = sft_loss_from_logits(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected)
    # targets are labels[:, 1:]: row 0 keeps positions 3..5 (3 tokens), row 1 keeps 1..3 (3 tokens)
    assert stats["sft/tokens"].item() == 6


def test_from_logits_accepts_low_precision_logits():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 11).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 6))
    loss, _ = sft_loss_from_logits(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].float().reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
