"""Loss aggregation: hand-computed modes, data-parallel shard invariance, errors."""

import pytest
import torch

from rlhf.algorithms.aggregation import LOSS_AGGREGATIONS, aggregate, count_seqs, count_tokens
from rlhf.errors import ConfigError

# row 0 has 3 real tokens (1, 2, 3), row 1 has 2 (4, 5); the 100s are padding
LOSS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_token_mean():
    # (1 + 2 + 3 + 4 + 5) / 5 tokens = 3
    assert aggregate(LOSS, MASK, "token_mean").item() == pytest.approx(3.0)


def test_seq_mean_token_mean():
    # row means 6/3 = 2 and 9/2 = 4.5; mean over 2 sequences = 3.25
    assert aggregate(LOSS, MASK, "seq_mean_token_mean").item() == pytest.approx(3.25)


def test_seq_mean_token_sum():
    # row sums 6 and 9; mean over 2 sequences = 7.5
    assert aggregate(LOSS, MASK, "seq_mean_token_sum").item() == pytest.approx(7.5)


def test_seq_mean_token_sum_norm():
    # row sums 6 and 9 divided by C = 4 -> 1.5 and 2.25; mean = 1.875
    loss = aggregate(LOSS, MASK, "seq_mean_token_sum_norm", constant_normalizer=4)
    assert loss.item() == pytest.approx(1.875)


def test_seq_mean_token_sum_norm_requires_a_normalizer():
    with pytest.raises(ConfigError, match="constant_normalizer"):
        aggregate(LOSS, MASK, "seq_mean_token_sum_norm")


def test_fully_masked_rows_do_not_count_as_sequences():
    loss = torch.cat([LOSS, torch.full((1, 4), 7.0)])
    mask = torch.cat([MASK, torch.zeros(1, 4, dtype=MASK.dtype)])
    assert count_seqs(mask).item() == 2 and count_tokens(mask).item() == 5
    assert aggregate(loss, mask, "seq_mean_token_sum").item() == pytest.approx(7.5)


def test_empty_batch_gives_zero_not_nan():
    for mode in LOSS_AGGREGATIONS:
        loss = aggregate(LOSS, torch.zeros_like(MASK), mode, constant_normalizer=4)
        assert loss.item() == 0.0


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS.names())
def test_data_parallel_shards_sum_to_the_full_batch_loss(mode):
    torch.manual_seed(0)
    loss_mat = torch.randn(6, 5)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = torch.arange(5) < lengths[:, None]
    full = aggregate(loss_mat, mask, mode, constant_normalizer=5)
    # uneven shards: 2 rows and 4 rows
    shards = [(loss_mat[:2], mask[:2]), (loss_mat[2:], mask[2:])]
    global_tokens, global_seqs = count_tokens(mask), count_seqs(mask)
    total = sum(
        aggregate(lm, m, mode, global_tokens=global_tokens, global_seqs=global_seqs, constant_normalizer=5)
        for lm, m in shards
    )
    torch.testing.assert_close(total, full)


def test_global_counts_accept_python_numbers():
    # token_mean with global_tokens = 10 instead of 5: 15 / 10
    assert aggregate(LOSS, MASK, "token_mean", global_tokens=10).item() == pytest.approx(1.5)
    assert aggregate(LOSS, MASK, "seq_mean_token_sum", global_seqs=3).item() == pytest.approx(5.0)


def test_unknown_mode_lists_known_modes_close_first():
    with pytest.raises(ConfigError) as err:
        aggregate(LOSS, MASK, "token_means")
    message = str(err.value)
    assert "known: token_mean," in message
    for name in LOSS_AGGREGATIONS.names():
        assert name in message
