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
