"""Offline objectives in one process: micro-batch shares add up to the whole minibatch's values.

The tiny causal LM / reward model is random (vocab 64); batches are collated like the offline
controller's (pairs and KTO rows interleaved). For each registered objective, the loss and the
stats of the whole batch in one piece must equal the sum of its micro-batch shares (1e-5), and a
gradient step's gradient must equal too: that is what makes the update independent of the
micro-batch size and (with all-reduced counts) of the data-parallel layout.
"""

from __future__ import annotations

import pytest
import torch

from rlhf.config import OfflineConfig
from rlhf.data.collate import collate_kto, collate_pairs, collate_sequences
from rlhf.data.examples import KTOExample, PairExample, SequenceExample
from rlhf.workers.objectives import OBJECTIVES, sequence_logprobs

VOCAB = 64
PAD = 0


@pytest.fixture(scope="module")
def models():
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=PAD,
        num_labels=1,
    )
    torch.manual_seed(0)
    return {"causal_lm": Qwen2ForCausalLM(config).eval(), "reward": Qwen2ForSequenceClassification(config).eval()}


def ids(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=gen).tolist()


def make_batch(kind: str, examples: int = 6):
    gen = torch.Generator().manual_seed(1)
    if kind == "sequence":
        seqs = []
        for i in range(examples):
            response = ids(gen, 2 + i % 4)
            seqs.append(SequenceExample(ids(gen, 1 + i % 3), response, [1] * len(response)))
        return collate_sequences(seqs, PAD)
    if kind == "pair":
        pairs = [
            PairExample(ids(gen, 2 + i % 2), ids(gen, 2 + i % 3), ids(gen, 1 + i % 4), margin=0.5)
            for i in range(examples)
        ]
        return collate_pairs(pairs, PAD)
    kto = [KTOExample(ids(gen, 2 + i % 2), ids(gen, 2 + i % 3), desirable=i % 3 != 0) for i in range(examples)]
    return collate_kto(kto, PAD)


def identity(tensor):
    return tensor


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_micro_batch_shares_sum_to_the_minibatch(models, name):
    objective = OBJECTIVES.get(name)(OfflineConfig(objective=name, rm_use_margin=True, beta=0.5))
    model = models[objective.model_kind]
    batch = make_batch(objective.example_kind)
    with torch.no_grad():  # a reference that differs from the policy, so DPO/KTO margins are not 0
        aux = sequence_logprobs(models["causal_lm"], batch) + torch.linspace(-1, 1, len(batch))
    counts = objective.local_counts(batch)

    def run(micro_rows: int):
        model.zero_grad()
        state = objective.begin_minibatch(model, batch, aux, identity, micro_rows)
        total, stats = 0.0, {}
        for start in range(0, len(batch), micro_rows):
            micro = batch.select(slice(start, start + micro_rows))
            loss, shares = objective.micro_loss(model, micro, aux[start : start + micro_rows], counts, state)
            loss.backward()
            total = total + loss.detach()
            for key, value in shares.items():
                stats[key] = stats.get(key, 0.0) + value
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return total, stats, grads

    whole, whole_stats, whole_grads = run(len(batch))
    rows = objective.rows_per_example
    split, split_stats, split_grads = run(rows)  # one example per micro-batch
    assert torch.isfinite(whole) and whole_stats.keys() == split_stats.keys()
    assert split == pytest.approx(float(whole), abs=1e-5)
    for key in whole_stats:
        assert float(split_stats[key]) == pytest.approx(float(whole_stats[key]), abs=1e-5), key
        assert not whole_stats[key].requires_grad
    assert torch.allclose(split_grads, whole_grads, atol=1e-6, rtol=1e-4)
    assert float(whole_stats[f"{objective.prefix}/loss"]) == pytest.approx(float(whole), abs=1e-6)


def test_kto_reference_point_is_the_clamped_mean_of_the_mismatched_rows(models):
    objective = OBJECTIVES.get("kto")(OfflineConfig(objective="kto"))
    model = models["causal_lm"]
    batch = make_batch("kto")
    with torch.no_grad():
        policy = sequence_logprobs(model, batch)
    kl_rows = batch.labels < 0
    # reference 0.3 nats below the policy on every mismatched row: z0 = mean(policy - ref) = 0.3
    z0 = objective.begin_minibatch(model, batch, policy - 0.3, identity, 4)["z0"]
    assert float(z0) == pytest.approx(0.3, abs=1e-5)
    # a reference above the policy gives a negative mean: clamped at 0
    assert float(objective.begin_minibatch(model, batch, policy + 0.3, identity, 4)["z0"]) == 0.0
    assert int(kl_rows.sum()) == len(batch) // 2
