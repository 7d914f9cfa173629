"""pass@k against hand counts of k-subsets (Chen et al. 2021, eq. 1)."""

from __future__ import annotations

import itertools
from math import comb

import pytest

from rlhf.algorithms.pass_at_k import mean_pass_at_k, pass_at_k
from rlhf.errors import ConfigError


def test_pass_at_1_is_the_fraction_correct():
    # n=4, c=1: 1 - C(3,1)/C(4,1) = 1 - 3/4
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 7, 1) == pytest.approx(0.7)


def test_hand_counted_subsets():
    # n=4, c=2, k=2: of the C(4,2)=6 pairs only {wrong, wrong} fails -> 1 - 1/6 = 5/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    # n=5, c=1, k=3: subsets without the one correct sample: C(4,3)=4 of C(5,3)=10 -> 1 - 4/10
    assert pass_at_k(5, 1, 3) == pytest.approx(0.6)


def test_edges():
    assert pass_at_k(8, 0, 8) == 0.0  # nothing correct
    assert pass_at_k(8, 8, 1) == 1.0  # all correct
    assert pass_at_k(4, 2, 3) == 1.0  # only 2 wrong: any 3 samples include a correct one


@pytest.mark.parametrize("n,c,k", [(6, 2, 2), (7, 3, 4), (9, 1, 5), (5, 4, 2)])
def test_matches_enumeration_of_subsets(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    enumerated = sum(any(s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(enumerated)
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_mean_over_problems():
    # problems (n=4, c=0), (4, 1), (4, 4): pass@2 = (0 + (1 - C(3,2)/C(4,2)) + 1) / 3 = (0 + 0.5 + 1) / 3
    assert mean_pass_at_k([(4, 0), (4, 1), (4, 4)], 2) == pytest.approx(0.5)


def test_invalid_counts_raise():
    with pytest.raises(ConfigError, match="k <= samples"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ConfigError, match="correct <= samples"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ConfigError, match="empty"):
        mean_pass_at_k([], 1)
