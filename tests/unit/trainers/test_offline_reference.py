"""ReferenceLogprobs: the controller's cache of summed reference logprobs, with a stand-in reference group."""

from __future__ import annotations

import torch

from rlhf.data.collate import collate_kto, collate_pairs
from rlhf.data.examples import KTOExample, PairExample
from rlhf.trainers.offline import ReferenceLogprobs


class FakeReference:
    """Every response token has logprob -1, so a row's sum is minus its number of loss tokens."""

    def __init__(self):
        self.rows_scored = 0

    def call(self, method, batch, temperature):
        assert temperature == 1.0  # offline stages score data, not samples
        self.rows_scored += len(batch)
        return -torch.ones(batch.response_ids.shape)


PAIRS = [PairExample([1, 2], [3, 4, 5], [6]), PairExample([7], [8, 9], [10, 11, 12, 13])]
KTO = [KTOExample([1, 2], [3, 4, 5], True), KTOExample([7], [8, 9], False), KTOExample([5], [6], True)]


def test_precomputed_pairs_are_not_scored_again():
    group = FakeReference()
    reference = ReferenceLogprobs(group, cache=True)
    reference.precompute(PAIRS, lambda ex: collate_pairs(ex, 0))
    assert group.rows_scored == 4
    # a batch in another order is served from the cache: rows are matched by content
    values = reference(collate_pairs(PAIRS[::-1], 0))
    assert values.tolist() == [-2.0, -4.0, -3.0, -1.0]  # chosen/rejected lengths of pair 1, then pair 0
    assert group.rows_scored == 4


def test_kto_mismatched_rows_are_scored_per_batch():
    group = FakeReference()
    reference = ReferenceLogprobs(group, cache=True)
    reference.precompute(KTO, lambda ex: collate_kto(ex, 0))
    assert group.rows_scored == 3  # only the labelled rows
    values = reference(collate_kto(KTO, 0))
    # labelled rows from the cache, mismatched rows (response of the next example) scored now
    assert values.tolist() == [-3.0, -2.0, -2.0, -1.0, -1.0, -3.0]
    assert group.rows_scored == 3 + 3


def test_online_reference_scores_every_batch():
    group = FakeReference()
    reference = ReferenceLogprobs(group, cache=False)
    batch = collate_pairs(PAIRS, 0)
    reference(batch)
    reference(batch)
    assert group.rows_scored == 8
