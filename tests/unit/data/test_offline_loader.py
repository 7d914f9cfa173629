"""The offline loader: seeded epochs of fixed-size batches, resumed at exactly the next batch."""

import pytest

from rlhf.data.collate import collate_sequences
from rlhf.data.examples import SequenceExample
from rlhf.data.loader import OfflineLoader
from rlhf.errors import CheckpointError, DataError


def _loader(n=10, batch_size=3, seed=0, shuffle=True):
    return OfflineLoader(list(range(n)), batch_size, seed=seed, shuffle=shuffle, collate=list)


def test_epochs_skip_the_incomplete_tail_and_reshuffle():
    loader = _loader()
    assert loader.batches_per_epoch == 3  # 10 // 3
    epoch0 = list(loader.epoch_batches())
    assert len(epoch0) == 3 and all(len(b) == 3 for b in epoch0)
    assert len({i for b in epoch0 for i in b}) == 9  # no example twice in an epoch
    epoch1 = [loader.next_batch() for _ in range(3)]
    assert loader.epoch == 1 and epoch1 != epoch0
    assert _loader(shuffle=False).next_batch() == [0, 1, 2]


def test_state_resumes_at_the_next_batch():
    loader = _loader(seed=5)
    for _ in range(4):  # one batch into epoch 1
        loader.next_batch()
    state = loader.state()
    assert (state["epoch"], state["batch"]) == (1, 1)
    expected = [loader.next_batch() for _ in range(5)]
    resumed = _loader(seed=5)
    resumed.load_state(state)
    assert [resumed.next_batch() for _ in range(5)] == expected


def test_state_from_other_data_is_refused():
    state = _loader(n=10).state()
    with pytest.raises(CheckpointError, match="ran over 10 examples in batches of 3 with seed 0, this run has 12"):
        _loader(n=12).load_state(state)


def test_too_few_examples_for_one_batch():
    with pytest.raises(DataError, match="has 2 examples, fewer than one batch of 3"):
        _loader(n=2)


def test_collates_real_examples():
    examples = [SequenceExample([i], [i + 100], [1]) for i in range(4)]
    loader = OfflineLoader(examples, 2, seed=0, shuffle=False, collate=lambda rows: collate_sequences(rows, 0))
    assert loader.next_batch().response_ids.tolist() == [[100], [101]]
