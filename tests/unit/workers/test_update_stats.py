"""What the policy update reports when it computes the old logprobs itself (rlhf.workers.policy, trainable)."""

from __future__ import annotations

import pytest
import torch

from rlhf.algorithms import rollout_mismatch
from rlhf.models.tiny import build_tiny_model
from rlhf.workers.policy import PolicyWorker
from rlhf.workers.trainable import StepStats, dropout_layers


def test_micro_batch_shares_of_the_mismatch_add_up_to_the_whole_batch():
    """The update sees the batch in micro-batches; summed with the global token count and maxed over them, the
    engine-vs-trainer stats equal rollout_mismatch's over the whole batch (rows of uneven lengths)."""
    generator = torch.Generator().manual_seed(0)
    engine = -torch.rand(6, 5, generator=generator) * 3
    trainer = engine + torch.randn(6, 5, generator=generator) * 0.3
    mask = (torch.arange(5) < torch.tensor([[5], [1], [3], [4], [2], [5]])).float()
    tokens = mask.sum()
    stats = StepStats()
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        PolicyWorker._mismatch_stats(engine[rows], trainer[rows], mask[rows], tokens, stats)
    stats.minibatches = 1
    got = stats.reduce(world_size=1, device=torch.device("cpu"))
    want = rollout_mismatch(engine, trainer, mask)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-6, abs=1e-9), key


def test_dropout_layers_finds_what_makes_the_train_forward_random():
    model = build_tiny_model("qwen2", vocab_size=32)
    assert dropout_layers(model) == []  # the update's forward is the eval forward: old logprobs can come from it
    model.config.attention_dropout = 0.1
    assert dropout_layers(model) == ["config.attention_dropout"]
    model.config.attention_dropout = 0.0
    model.model.layers[1].mlp.add_module("drop", torch.nn.Dropout(0.05))
    assert dropout_layers(model) == ["model.layers.1.mlp.drop"]
