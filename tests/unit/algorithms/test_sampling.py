"""Dynamic sampling (DAPO): which groups are informative, and which rows fill the batch."""

import torch

from rlhf.algorithms import compute_grpo_advantages
from rlhf.algorithms.sampling import informative_groups, select_groups


def test_informative_groups_hand_computed():
    # groups of 2: g0 scores [1, 1] (all right), g1 [0, 1] (mixed), g2 [0, 0] (all wrong), g3 [0.5, 0.5000001]
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5000001])
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    keep = informative_groups(scores, group_ids)
    # only g1 differs by more than the 1e-6 tolerance
    assert keep.tolist() == [False, False, True, True, False, False, False, False]


def test_informative_groups_any_id_order_and_singletons():
    # ids need not be sorted or contiguous; a group of one is never informative
    scores = torch.tensor([0.0, 2.0, 1.0, 1.0, 3.0])
    group_ids = torch.tensor([7, 3, 7, 3, 5])
    assert informative_groups(scores, group_ids).tolist() == [True, True, True, True, False]


def test_uninformative_groups_are_exactly_those_with_zero_grpo_advantage():
    torch.manual_seed(0)
    scores = torch.randint(0, 2, (32,)).float()
    group_ids = torch.arange(8).repeat_interleave(4)
    mask = torch.ones(32, 3)
    advantages, _ = compute_grpo_advantages(scores, mask, group_ids)
    zero = (advantages == 0).all(dim=-1)
    assert torch.equal(~informative_groups(scores, group_ids), zero)


def test_select_groups_takes_informative_first_in_order():
    # 4 groups of 2, informative: g1, g3; want 2 -> rows of g1 then g3, no padding
    informative = torch.tensor([False, False, True, True, False, False, True, True])
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    rows, padded = select_groups(informative, group_ids, 2)
    assert rows.tolist() == [2, 3, 6, 7] and padded == 0
    # want 1 -> only the first informative group
    rows, padded = select_groups(informative, group_ids, 1)
    assert rows.tolist() == [2, 3] and padded == 0


def test_select_groups_pads_with_earliest_uninformative_groups():
    # 3 groups of 2, only g2 informative; want 2 -> g2, then g0 as padding
    informative = torch.tensor([False, False, False, False, True, True])
    group_ids = torch.tensor([10, 10, 11, 11, 12, 12])
    rows, padded = select_groups(informative, group_ids, 2)
    assert rows.tolist() == [4, 5, 0, 1] and padded == 1


def test_select_groups_rejects_too_few_groups():
    import pytest

    with pytest.raises(ValueError, match="needs 3 groups, got 2"):
        select_groups(torch.tensor([True, True, False, False]), torch.tensor([0, 0, 1, 1]), 3)


def test_filter_and_grpo_agree_on_constant_and_spread_groups_of_any_size_and_scale():
    # DAPO keeps exactly the groups with a nonzero GRPO advantage: constant groups of any size and
    # magnitude are dropped, groups with a 10% spread kept
    for size in (2, 3, 8, 16, 64):
        for magnitude in (1e-3, 0.7, 15.9, 1e3):
            constant = torch.full((size,), magnitude)
            spread = constant.clone()
            spread[0] = magnitude * 1.1
            scores = torch.cat([constant, spread])
            group_ids = torch.arange(2).repeat_interleave(size)
            keep = informative_groups(scores, group_ids)
            assert keep.tolist() == [False] * size + [True] * size, (size, magnitude)
            advantages, _ = compute_grpo_advantages(scores, torch.ones(2 * size, 1), group_ids)
            assert torch.equal(keep, (advantages != 0).any(dim=-1))
