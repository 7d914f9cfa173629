"""Per-tensor checksums of the weight sync (rlhf.engines.checksum), by construction."""

from __future__ import annotations

import torch

from rlhf.engines.checksum import checksums, differences, tensor_checksum


def test_equal_bytes_equal_checksums_and_any_change_shows():
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    assert tensor_checksum(weight) == tensor_checksum(weight.clone())
    nudged = weight.clone()
    nudged[17, 3] += 1e-6
    assert tensor_checksum(nudged) != tensor_checksum(weight)
    # a transposed square matrix holds the same words in other places: the position-weighted sum tells
    assert tensor_checksum(weight.t().contiguous()) != tensor_checksum(weight)
    assert tensor_checksum(torch.zeros(0)) == "0:0:0"


def test_views_into_a_bucket_at_any_offset_and_dtype():
    """Bucket views start anywhere (a bf16 tensor at an odd element offset is not int32-aligned)."""
    bucket = torch.randn(1001).to(torch.bfloat16)
    view = bucket[1:8]  # 7 bf16 elements, 14 bytes, 2-byte aligned
    assert tensor_checksum(view) == tensor_checksum(view.clone())
    assert tensor_checksum(bucket[3:1001]) == tensor_checksum(bucket[3:1001].clone())
    assert tensor_checksum(torch.arange(5, dtype=torch.uint8)) == tensor_checksum(torch.arange(5, dtype=torch.uint8))


def test_differences_name_changed_missing_and_unexpected_tensors():
    a, b = torch.ones(3), torch.zeros(3)
    sent = checksums([("w1", a), ("w2", a), ("w3", a)])
    loaded = checksums([("w1", a), ("w2", b), ("w4", a)])
    assert differences(sent, loaded) == (["w2"], ["w3"], ["w4"])
    assert differences(sent, sent) == ([], [], [])


def test_swapped_blocks_and_tails_change_the_checksum():
    words = torch.randn(4096 + 37, generator=torch.Generator().manual_seed(1))
    swapped = torch.cat([words[1024:2048], words[:1024], words[2048:]])  # two whole rows of 1024 exchanged
    assert tensor_checksum(swapped) != tensor_checksum(words)
    tail = words.clone()
    tail[-1], tail[-2] = words[-2], words[-1]  # in the part past the last full row
    assert tensor_checksum(tail) != tensor_checksum(words)
