"""ZeRO-3 buffer sizes (rlhf.engines.zero3.zero3_gather_limits)."""

from __future__ import annotations

from torch import nn

from rlhf.engines.zero3 import GATHER_WINDOW_FRACTION, zero3_gather_limits


def test_window_is_a_64th_of_the_model_and_bounds_gather_reduce_and_optimizer_sub_groups():
    # 128 layers of 64x64 (4096 elements each): the window is 128 * 4096 / 64 = 8192 elements
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(128)])
    limits = zero3_gather_limits(model)
    window = 128 * 64 * 64 // GATHER_WINDOW_FRACTION
    assert window == 8192
    assert limits["stage3_max_live_parameters"] == limits["stage3_max_reuse_distance"] == window
    assert limits["stage3_prefetch_bucket_size"] == window // 2
    assert limits["reduce_bucket_size"] == window
    # the optimizer steps the partition a window at a time, not the whole partition in one sub-group
    assert limits["sub_group_size"] == window


def test_window_never_below_the_largest_parameter():
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 8))
    limits = zero3_gather_limits(model)
    assert limits["stage3_max_live_parameters"] == 64_000
    assert limits["sub_group_size"] == 64_000
