"""Packed rows give every example exactly the logits it gets alone (no attention across examples)."""

import pytest
import torch

from rlhf.data.collate import collate_packed, collate_sequences
from rlhf.data.examples import SequenceExample
from rlhf.data.packing import pack_sequences
from rlhf.models.logprobs import forward_inputs, full_logits, response_logprobs
from rlhf.models.tiny import build_tiny_model

PAD = 0


def _examples(vocab_size):
    generator = torch.Generator().manual_seed(0)
    examples = []
    for n, prompt in [(5, 2), (9, 3), (3, 1), (12, 4), (7, 2), (4, 1), (2, 1), (6, 3)]:
        ids = torch.randint(3, vocab_size, (n,), generator=generator).tolist()
        examples.append(SequenceExample(ids[:prompt], ids[prompt:], [1] * (n - prompt), f"example {len(examples)}"))
    return examples


@pytest.fixture(scope="module")
def vocab_size(tiny_tokenizer):
    return len(tiny_tokenizer)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(arch, attention, vocab_size):
    model = build_tiny_model(arch, vocab_size=vocab_size).eval()
    model.config._attn_implementation = attention
    examples = _examples(vocab_size)
    rows = pack_sequences(examples, max_length=16, pad_id=PAD)
    assert [row.lengths for row in rows] == [(5, 9, 2), (3, 12), (7, 4), (6,)]  # several examples per row
    batch = collate_packed(rows, PAD)
    with torch.no_grad():
        packed = full_logits(model, batch)
        # the one-row layout flash-attention needs gives the same logits
        flat = model(**forward_inputs(batch, flatten=True), use_cache=False).logits.view_as(packed)
        for i, row in enumerate(rows):
            start = 0
            for length in row.lengths:
                alone = model(input_ids=torch.tensor([row.input_ids[start : start + length]])).logits[0]
                torch.testing.assert_close(packed[i, start : start + length], alone, atol=1e-5, rtol=0)
                torch.testing.assert_close(flat[i, start : start + length], alone, atol=1e-5, rtol=0)
                start += length


def test_packed_response_logprobs_match_the_padded_batch_on_loss_tokens(vocab_size):
    model = build_tiny_model("qwen2", vocab_size=vocab_size).eval()
    examples = _examples(vocab_size)
    rows = pack_sequences(examples, max_length=16, pad_id=PAD)
    packed, padded = collate_packed(rows, PAD), collate_sequences(examples, PAD)
    with torch.no_grad():
        packed_logprobs, _ = response_logprobs(model, packed)
        padded_logprobs, _ = response_logprobs(model, padded)
    # every example contributes the same loss-token logprobs, in the same order, either way
    from_packed = packed_logprobs[packed.loss_mask.bool()]
    order = [rows_example for row in rows for rows_example in row.where]
    by_example = {ex.where: padded_logprobs[i][padded.loss_mask[i].bool()] for i, ex in enumerate(examples)}
    torch.testing.assert_close(from_packed, torch.cat([by_example[w] for w in order]), atol=1e-5, rtol=0)
    assert int(packed.loss_mask.sum()) == sum(len(e.response_ids) for e in examples)


# -- token-budget micro-batches of RL rows (rlhf.data.token_budget) ----------------------------------


def _rollout_rows(vocab_size):
    """Left-padded prompts and right-padded responses of very different lengths (1 to 12 tokens)."""
    from rlhf.data.batch import RolloutBatch, pad_sequences

    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in (3, 5, 2, 4, 1, 6)]
    responses = [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in (7, 1, 12, 3, 9, 5)]
    prompt_ids, prompt_mask = pad_sequences(prompts, pad_id=PAD, left=True)
    response_ids, response_mask = pad_sequences(responses, pad_id=PAD, left=False)
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask)


def _packed_micro_batches(batch, max_tokens=20):
    from rlhf.data.token_budget import pack_rows, sequence_lengths, token_budget_bins

    bins = token_budget_bins(sequence_lengths(batch), max_tokens, field="policy.max_tokens_per_micro_batch")
    assert len(bins) > 1 and any(len(rows) > 1 for rows in bins)  # several micro-batches, several rows each
    return [(rows, pack_rows(batch.select(rows))) for rows in bins]


def _in_rows(batch, pieces):
    """[B, ...] from (rows, [b, ...]) pieces."""
    out = torch.zeros(len(batch), *pieces[0][1].shape[1:])
    for rows, piece in pieces:
        out[rows] = piece
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_rl_logprobs_and_entropy_equal_the_padded_batch(arch, vocab_size):
    model = build_tiny_model(arch, vocab_size=vocab_size).eval()
    batch = _rollout_rows(vocab_size)
    with torch.no_grad():
        padded = response_logprobs(model, batch, temperature=0.7, with_entropy=True)
        packed = [
            (rows, response_logprobs(model, m, temperature=0.7, with_entropy=True))
            for rows, m in _packed_micro_batches(batch)
        ]
    mask = batch.response_mask.bool()
    for k in range(2):  # logprobs, entropy
        result = _in_rows(batch, [(rows, out[k]) for rows, out in packed])
        torch.testing.assert_close(result[mask], padded[k][mask], atol=1e-5, rtol=0)
        assert (result[~mask] == 0).all()  # padding: zero, not a stray value


def test_packed_rl_policy_loss_gradients_equal_the_padded_batch(vocab_size):
    from rlhf.algorithms import (
        POLICY_LOSSES,
        aggregate,
        count_seqs,
        count_tokens,
        entropy_from_logits,
        logprobs_from_logits,
    )
    from rlhf.data.token_budget import rows_of
    from rlhf.models.logprobs import response_token_logits, to_rows

    batch = _rollout_rows(vocab_size)
    generator = torch.Generator().manual_seed(2)
    batch = batch.replace(
        old_logprobs=-torch.rand(batch.response_ids.shape, generator=generator) * 4,
        advantages=torch.randn(batch.response_ids.shape, generator=generator),
    )
    counts = {"global_tokens": count_tokens(batch.response_mask), "global_seqs": count_seqs(batch.response_mask)}

    def loss_of(model, micro):  # the policy worker's loss: PPO clip, seq-mean-token-mean, entropy bonus
        rows = rows_of(micro)
        logits, labels = response_token_logits(model, micro, temperature=0.7)
        logprobs = to_rows(micro, logprobs_from_logits(logits, labels))
        loss, _ = POLICY_LOSSES.get("ppo")(
            logprobs, rows.old_logprobs, rows.advantages, rows.response_mask,
            clip_low=0.2, clip_high=0.2, agg="seq_mean_token_mean", **counts,
        )  # fmt: skip
        entropy = aggregate(
            to_rows(micro, entropy_from_logits(logits)), rows.response_mask, "seq_mean_token_mean", **counts
        )
        return loss - 0.01 * entropy

    grads = []
    for micros in ([batch], [m for _, m in _packed_micro_batches(batch)]):
        model = build_tiny_model("qwen2", vocab_size=vocab_size)
        total = sum(loss_of(model, micro) for micro in micros)
        total.backward()
        grads.append((total.detach(), [p.grad.clone() for p in model.parameters()]))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = grads
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=0)
    for packed_grad, padded_grad in zip(packed_grads, padded_grads):
        torch.testing.assert_close(packed_grad, padded_grad, atol=1e-6, rtol=1e-4)


def test_packed_values_and_reward_scores_equal_the_padded_batch(vocab_size):
    from transformers import AutoModel, AutoModelForSequenceClassification

    from rlhf.models.logprobs import last_token_scores
    from rlhf.models.tiny import tiny_config
    from rlhf.models.value_model import ValueModel, response_values

    batch = _rollout_rows(vocab_size)
    micros = _packed_micro_batches(batch)
    config = tiny_config("llama", vocab_size=vocab_size)
    torch.manual_seed(0)
    critic = ValueModel(AutoModel.from_config(config), config.hidden_size).eval()
    config.num_labels = 1
    reward_model = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        values = _in_rows(batch, [(rows, response_values(critic, m)) for rows, m in micros])
        scores = _in_rows(batch, [(rows, last_token_scores(reward_model, m)) for rows, m in micros])
        mask = batch.response_mask.bool()
        torch.testing.assert_close(values[mask], response_values(critic, batch)[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(scores, last_token_scores(reward_model, batch), atol=1e-5, rtol=0)
