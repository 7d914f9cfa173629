"""Dispatch declarations and the driver-side split/collect helpers of WorkerGroup (no Ray cluster)."""

from __future__ import annotations

import pytest
import torch

from rlhf.data.batch import RolloutBatch
from rlhf.errors import ConfigError
from rlhf.workers.group import DispatchSpec, Worker, _collect, _per_rank_arguments, dispatch


def _batch(n: int) -> RolloutBatch:
    ids = torch.arange(n).unsqueeze(1).repeat(1, 3)
    ones = torch.ones(n, 3, dtype=torch.long)
    return RolloutBatch(prompt_ids=ids, prompt_mask=ones, response_ids=ids, response_mask=ones)


def test_dispatch_stores_a_readable_spec():
    @dispatch("split_dp", collect="concat")
    def method(self, batch):
        return batch

    assert method.dispatch_spec == DispatchSpec("split_dp", "concat")
    assert Worker.ping.dispatch_spec == DispatchSpec("broadcast", "list")


@pytest.mark.parametrize("mode,collect", [("scatter", "list"), ("broadcast", "sum")])
def test_unknown_modes_are_rejected(mode, collect):
    with pytest.raises(ValueError, match="unknown"):
        dispatch(mode, collect=collect)


def test_split_dp_cuts_batches_tensors_and_lists_before_sending():
    calls = _per_rank_arguments("split_dp", 2, (_batch(4), torch.arange(4), [1, 2, 3, 4], 0.5), {}, "w.m")
    shard0, shard1 = calls[0][0], calls[1][0]
    assert shard0[0].prompt_ids[:, 0].tolist() == [0, 1] and shard1[0].prompt_ids[:, 0].tolist() == [2, 3]
    assert shard1[1].tolist() == [2, 3] and shard1[1].untyped_storage().nbytes() == 2 * 8  # a copy, not a view
    assert shard0[2] == [1, 2] and shard1[3] == 0.5


def test_split_dp_rejects_uneven_batches():
    with pytest.raises(ConfigError, match="5 rows cannot be split into 2 equal"):
        _per_rank_arguments("split_dp", 2, (_batch(5),), {}, "w.m")


def test_all_mode_needs_one_value_per_rank():
    calls = _per_rank_arguments("all", 2, ([10, 20],), {"tag": ("a", "b")}, "w.m")
    assert calls[1] == ((20,), {"tag": "b"})
    with pytest.raises(ValueError, match="list of 2 per-rank values"):
        _per_rank_arguments("all", 2, ([10],), {}, "w.m")


def test_collect_modes():
    assert _collect("first", [1, 2], "w") == 1
    assert _collect("mean", [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0}], "w") == {"a": 2.0, "b": 3.0}
    assert _collect("concat", [torch.ones(2, 3), torch.zeros(1, 3)], "w").shape == (3, 3)
    assert len(_collect("concat", [_batch(2), _batch(3)], "w")) == 5
    assert _collect("concat", [[1], [2, 3]], "w") == [1, 2, 3]


def test_split_dp_with_a_row_order_moves_every_row_argument_and_concat_restores_it():
    order = [3, 0, 2, 1]  # rank 0 gets rows 3, 0 and rank 1 rows 2, 1
    calls = _per_rank_arguments("split_dp", 2, (_batch(4), torch.arange(4), [10, 11, 12, 13]), {"n": 5}, "w.m", order)
    assert calls[0][0][0].prompt_ids[:, 0].tolist() == [3, 0] and calls[1][0][0].prompt_ids[:, 0].tolist() == [2, 1]
    assert calls[1][0][1].tolist() == [2, 1] and calls[0][0][2] == [13, 10] and calls[0][1] == {"n": 5}
    # the ranks answer per row, in their shard's order; concat puts the rows back where they came from
    answers = [torch.tensor([30.0, 0.0]), torch.tensor([20.0, 10.0])]
    assert _collect("concat", answers, "w", order).tolist() == [0.0, 10.0, 20.0, 30.0]
    assert _collect("concat", [["d", "a"], ["c", "b"]], "w", order) == ["a", "b", "c", "d"]
    batches = [calls[0][0][0], calls[1][0][0]]
    assert _collect("concat", batches, "w", order).prompt_ids[:, 0].tolist() == [0, 1, 2, 3]
    assert _collect("mean", [1.0, 3.0], "w", order) == 2.0
    with pytest.raises(TypeError, match="one answer row per input row \\(4\\), got 3"):
        _collect("concat", [torch.zeros(2), torch.zeros(1)], "w", order)
