"""Collators, packing and the new RolloutBatch fields: padding, masks, interleaving, positions."""

import pytest
import torch

from rlhf.data.batch import RolloutBatch
from rlhf.data.collate import collate_kto, collate_packed, collate_pairs, collate_sequences
from rlhf.data.examples import KTOExample, PairExample, SequenceExample
from rlhf.data.packing import first_fit, pack_sequences
from rlhf.errors import DataError

PAD = 0


def test_sequences_pad_prompts_left_responses_right_and_keep_the_loss_mask():
    examples = [
        SequenceExample([11, 12], [13, 14, 15], [1, 0, 1], "a"),
        SequenceExample([21], [22], [1], "b"),
    ]
    batch = collate_sequences(examples, PAD)
    assert batch.prompt_ids.tolist() == [[11, 12], [0, 21]]
    assert batch.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert batch.response_ids.tolist() == [[13, 14, 15], [22, 0, 0]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.loss_mask.tolist() == [[1, 0, 1], [1, 0, 0]]
    assert batch.metadata == [{"where": "a"}, {"where": "b"}]


def test_pairs_are_interleaved_chosen_then_rejected():
    pairs = [PairExample([1, 2], [3], [4, 4], 0.5, "p0"), PairExample([5], [6, 6], [7], 1.0, "p1")]
    batch = collate_pairs(pairs, PAD)
    assert batch.prompt_ids.tolist() == [[1, 2], [1, 2], [0, 5], [0, 5]]
    assert batch.response_ids.tolist() == [[3, 0], [4, 4], [6, 6], [7, 0]]
    assert batch.margins.tolist() == [0.5, 0.5, 1.0, 1.0]
    # any even split keeps each pair in one shard
    first, second = batch.split(2)
    assert first.response_ids.tolist() == [[3, 0], [4, 4]] and second.margins.tolist() == [1.0, 1.0]


def test_kto_rows_pair_each_prompt_with_the_next_response_for_the_kl_reference():
    examples = [
        KTOExample([1], [10], True, "a"),
        KTOExample([2], [20, 21], False, "b"),
        KTOExample([3], [30], True, "c"),
    ]
    batch = collate_kto(examples, PAD)
    assert batch.prompt_ids.tolist() == [[1], [1], [2], [2], [3], [3]]
    # row 2i: (prompt_i, response_i); row 2i+1: (prompt_i, response_{(i+1) mod 3})
    assert batch.response_ids.tolist() == [[10, 0], [20, 21], [20, 21], [30, 0], [30, 0], [10, 0]]
    assert batch.labels.tolist() == [1, -1, 0, -1, 1, -1]
    cut = collate_kto(examples, PAD, max_length=2)  # prompt 1 token → mismatched responses cut to 1 token
    assert cut.response_ids[1].tolist() == [20, 0]
    with pytest.raises(ValueError, match="at least 2 examples"):
        collate_kto(examples[:1], PAD)


def test_first_fit_puts_each_item_in_the_earliest_row_with_room():
    # capacity 16: 5 → row 0 (11 left), 9 → row 0 (2 left), 3 → row 1 (13 left), 12 → row 1 (1 left),
    # 7 → row 2 (9 left), 4 → row 2 (5 left), 2 → row 0 (0 left), 6 → no row has 6 free: row 3
    assert first_fit([5, 9, 3, 12, 7, 4, 2, 6], 16) == [[0, 1, 6], [2, 3], [4, 5], [7]]
    assert first_fit([16], 16) == [[0]]
    assert first_fit([1] * 5, 2) == [[0, 1], [2, 3], [4]]


def test_packed_rows_restart_positions_and_keep_each_examples_mask():
    examples = [
        SequenceExample([11, 12], [13, 14], [1, 1], "a"),  # 4 tokens
        SequenceExample([21], [22, 23], [0, 1], "b"),  # 3 tokens
        SequenceExample([31], [32, 33, 34, 35], [1, 1, 1, 1], "c"),  # 5 tokens: no room left in row 0 (cap 8)
    ]
    row0, row1 = pack_sequences(examples, max_length=8, pad_id=PAD)
    assert row0.input_ids == [11, 12, 13, 14, 21, 22, 23, 0]
    assert row0.positions == [0, 1, 2, 3, 0, 1, 2, 0]
    assert row0.loss_mask == [0, 0, 1, 1, 0, 0, 1, 0]
    assert row0.lengths == (4, 3) and row0.where == ("a", "b")
    assert row1.input_ids == [31, 32, 33, 34, 35, 0, 0, 0] and row1.positions == [0, 1, 2, 3, 4, 0, 1, 2]
    with pytest.raises(DataError, match="c: the example has 5 tokens, more than the packed row length"):
        pack_sequences(examples, max_length=4, pad_id=PAD)


def test_collate_packed_shifts_masks_onto_response_tokens():
    examples = [SequenceExample([11, 12], [13, 14], [1, 1], "a"), SequenceExample([21], [22, 23], [1, 1], "b")]
    rows = pack_sequences(examples, max_length=8, pad_id=PAD) + pack_sequences(examples[1:], max_length=8, pad_id=PAD)
    batch = collate_packed(rows, PAD)
    assert batch.prompt_ids.tolist() == [[11], [21]]
    assert batch.response_ids.tolist() == [[12, 13, 14, 21, 22, 23], [22, 23, 0, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    # targets: 13, 14 (a's response), 22, 23 (b's); never 21, whose logits come from a's last token
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]]
    assert batch.position_ids is batch.positions and batch.is_packed
    assert batch.metadata[0] == {"where": "a; b"}


def test_new_batch_fields_survive_select_concat_and_to():
    pairs = collate_pairs([PairExample([1], [2], [3], 0.5)], PAD)
    kto = collate_kto([KTOExample([4, 5], [6], True), KTOExample([7], [8, 9], False)], PAD)
    assert pairs.select([1]).margins.tolist() == [0.5]
    merged = RolloutBatch.concat([kto, kto.select([0, 1])])
    assert merged.labels.tolist() == [1, -1, 0, -1, 1, -1] and merged.margins is None
    packed = collate_packed(pack_sequences([SequenceExample([1], [2, 3], [1, 1])], max_length=4, pad_id=PAD), PAD)
    longer = collate_packed(
        pack_sequences([SequenceExample([1, 2], [3, 4, 5], [1] * 3)], max_length=6, pad_id=PAD), PAD
    )
    both = RolloutBatch.concat([packed, longer])
    assert both.positions.tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]
    assert both.loss_mask.tolist() == [[1, 1, 0, 0], [0, 1, 1, 1]]
    assert both.to("cpu").positions.dtype == torch.long
    with pytest.raises(ValueError, match=r"positions has shape \(1, 2\), expected \(1, 3\)"):
        packed.replace(positions=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="loss_mask has shape"):
        packed.replace(loss_mask=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="labels has shape"):
        kto.replace(labels=torch.zeros(3))
