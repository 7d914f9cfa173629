"""Token-budget plans (bins, spreading, balanced partitions, dp shard order) and packed tensors, by hand."""

from __future__ import annotations

import pytest
import torch

from rlhf.data.batch import RolloutBatch, pad_sequences
from rlhf.data.token_budget import (
    balanced_partition,
    dp_shard_order,
    first_fit_decreasing,
    inverse_order,
    pack_rows,
    restore_row_order,
    sequence_lengths,
    spread_bins,
    token_budget_bins,
)
from rlhf.errors import DataError


def test_first_fit_decreasing_places_the_longest_first():
    # sorted: 9 (row 1), 6 (row 3), 4 (row 2), 3 (row 0), 2 (row 4); capacity 10:
    # 9 opens bin 0 (1 left), 6 opens bin 1 (4 left), 4 fills bin 1, 3 opens bin 2 (7 left), 2 joins bin 2
    assert first_fit_decreasing([3, 9, 4, 6, 2], 10) == [[1], [2, 3], [0, 4]]


def test_token_budget_bins_name_the_field_for_a_row_too_long():
    assert token_budget_bins([5, 5, 5], 10, field="policy.max_tokens_per_micro_batch") == [[0, 1], [2]]
    with pytest.raises(DataError, match=r"row 1 has 11 tokens.*policy.max_tokens_per_micro_batch=10"):
        token_budget_bins([5, 11], 10, field="policy.max_tokens_per_micro_batch")


def test_balanced_partition_equal_rows_longest_first():
    # 8 -> A(8), 7 -> B(7), 6 -> B(13), 5 -> A(13), 4 -> A (tie 13/13, 2 items each, lower group) = 17,
    # 3 -> B, the only group with room = 16
    assert balanced_partition([8, 7, 6, 5, 4, 3], 2) == [[0, 3, 4], [1, 2, 5]]
    with pytest.raises(ValueError, match="5 items cannot be split into 2"):
        balanced_partition([1] * 5, 2)


def test_balanced_partition_any_rows():
    # 10 -> A, 3 -> B, 3 -> B (3 < 10), 2 -> B (6 < 10): sums 10 / 8
    assert balanced_partition([3, 10, 2, 3], 2, equal_rows=False) == [[1], [0, 2, 3]]
    # zero lengths still spread (ties go to the group with fewer items)
    assert balanced_partition([0, 0], 2, equal_rows=False) == [[0], [1]]


def test_spread_bins_halves_the_fullest_splittable_bin():
    # bin 0 holds 12 tokens (rows 0, 1, 2), bin 1 a single row: bin 0 is split into [0] (5) and [1, 2] (7)
    assert spread_bins([[0, 1, 2], [3]], [5, 4, 3, 6], 3) == [[0], [1, 2], [3]]
    # then [1, 2] is the only splittable one
    assert spread_bins([[0, 1, 2], [3]], [5, 4, 3, 6], 4) == [[0], [1], [2], [3]]
    assert spread_bins([[0], [1]], [1, 1], 2) == [[0], [1]]
    with pytest.raises(ValueError, match="cannot make 3 non-empty bins out of 2 items"):
        spread_bins([[0], [1]], [1, 1], 3)


def test_dp_shard_order_rebalances_each_minibatch_among_ranks():
    # 8 rows, 2 ranks, 2 rows per rank per minibatch. The plain split gives rank 0 rows 0-3 and rank 1 rows
    # 4-7; minibatch 0 is rows {0, 1} of rank 0 and {4, 5} of rank 1, minibatch 1 rows {2, 3} and {6, 7}.
    lengths = [9, 8, 1, 1, 7, 2, 5, 5]
    # minibatch 0 = rows 0, 1, 4, 5 with lengths 9, 8, 7, 2: 9 -> A, 8 -> B, 7 -> B (8 < 9), 2 -> A: 11 / 15
    # minibatch 1 = rows 2, 3, 6, 7 with lengths 1, 1, 5, 5: 5 -> A, 5 -> B, 1 -> A, 1 -> B: 6 / 6
    order = dp_shard_order(lengths, 2, minibatch_rows=2)
    assert order == [0, 5, 2, 6, 1, 4, 3, 7]
    # rank 0 = order[:4]: minibatch 0 is its rows 0, 5 (11 tokens; the plain split: rows 0, 1 = 17 against
    # rank 1's 9), minibatch 1 its rows 2, 6 (6 tokens)
    assert [sum(lengths[i] for i in order[k : k + 2]) for k in (0, 2, 4, 6)] == [11, 6, 15, 6]


def test_dp_shard_order_without_minibatches_balances_the_whole_batch():
    # one block: 6, 5, 4, 3, 2, 1 -> A 6, B 5, B 9, A 9, A 11 (tie, fewer items... both 2: lower group), B 10
    assert dp_shard_order([6, 5, 4, 3, 2, 1], 2) == [0, 3, 4, 1, 2, 5]
    assert dp_shard_order([6, 5, 4, 3, 2, 1], 2, minibatch_rows=2) == [0, 3, 4, 1, 2, 5]  # 2 does not divide 3
    with pytest.raises(ValueError, match="5 rows cannot be split into 2"):
        dp_shard_order([1] * 5, 2)


def test_inverse_order_and_restore_row_order():
    order = [2, 0, 3, 1]
    inverse = inverse_order(order)
    assert [order[i] for i in inverse] == [0, 1, 2, 3]
    parts = [torch.tensor([20.0, 0.0]), torch.tensor([30.0, 10.0])]  # rows [2, 0] then rows [3, 1]
    assert restore_row_order(parts, [[2, 0], [3, 1]]).tolist() == [0.0, 10.0, 20.0, 30.0]


def _rows() -> RolloutBatch:
    prompt_ids, prompt_mask = pad_sequences([[11, 12], [21], [31, 32, 33]], pad_id=0, left=True)
    response_ids, response_mask = pad_sequences([[13, 14, 15], [22, 23], [34]], pad_id=0, left=False)
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask)


def test_pack_rows_concatenates_real_tokens_with_positions_restarting():
    rows = _rows()
    assert sequence_lengths(rows) == [5, 3, 4]
    packed = pack_rows(rows)
    assert packed.inputs.input_ids.tolist() == [[11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34]]
    assert packed.inputs.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    # response token j of row i is predicted at the packed position before it: row 0's 13, 14, 15 sit at
    # 2, 3, 4 -> 1, 2, 3; row 1's 22, 23 at 6, 7 -> 5, 6; row 2's 34 at 11 -> 10
    assert packed.response_index.tolist() == [1, 2, 3, 5, 6, 10]
    assert packed.response_ids.tolist() == [13, 14, 15, 22, 23, 34]
    assert packed.last_index.tolist() == [4, 7, 11]
    assert packed.num_tokens == 12 and len(packed) == 3
    unpacked = packed.unpack(torch.arange(1.0, 7.0))
    assert unpacked.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [6.0, 0.0, 0.0]]


def test_unpack_passes_gradients_to_the_packed_values():
    packed = pack_rows(_rows())
    values = torch.ones(6, requires_grad=True)
    (packed.unpack(values) * torch.arange(9.0).view(3, 3)).sum().backward()
    assert values.grad.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 6.0]


def test_pack_rows_rejects_gaps_and_empty_prompts():
    rows = _rows()
    gap = rows.response_mask.clone()
    gap[0, 1] = 0
    with pytest.raises(DataError, match="row 0: response_mask has a gap"):
        pack_rows(rows.replace(response_mask=gap))
    no_prompt = rows.prompt_mask.clone()
    no_prompt[1] = 0
    with pytest.raises(DataError, match="row 1 has no prompt token"):
        pack_rows(rows.replace(prompt_mask=no_prompt))
