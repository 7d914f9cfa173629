"""Packing PT/SFT examples several to a row, so short examples do not waste padded tokens.

Rows are exactly `max_length` tokens (padding at the end). Examples are placed first-fit, in
dataset order: each goes into the earliest row that still has room for it, or opens a new row.
Every example stays whole (the encoder already cut it to max_length) and keeps its own order
inside its row. A segment tree over the rows' free space finds that row in O(log rows), so
packing a million examples takes seconds, not the O(examples × rows) of a linear scan.

Each row records, per token, its position within its own example (restarting at 0), which the
model forward turns into block-diagonal causal attention (rlhf.models.logprobs.forward_inputs),
and its loss mask: 0 on each example's first token (nothing in the example predicts it), on
prompts (unless the example's mask says otherwise) and on padding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from rlhf.data.examples import SequenceExample
from rlhf.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedRow:
    """One row of packed examples; every list has one entry per token of the row (max_length)."""

    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target
    positions: list[int]  # position of the token within its example; padding counts from 0 again
    lengths: tuple[int, ...]  # tokens of each example, in row order (padding not included)
    where: tuple[str, ...]  # each example's row location

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return sum(self.lengths)


def pack_sequences(examples: Sequence[SequenceExample], *, max_length: int, pad_id: int) -> list[PackedRow]:
    """Pack `examples` first-fit into rows of exactly `max_length` tokens (see the module docstring)."""
    if not examples:
        raise DataError("nothing to pack: the dataset has no examples")
    too_long = [e for e in examples if len(e) > max_length]
    if too_long:
        raise DataError(
            f"{too_long[0].where}: the example has {len(too_long[0])} tokens, more than the packed row "
            f"length data.max_length={max_length}; encode with the same max_length (it truncates or drops)"
        )
    bins = first_fit([len(e) for e in examples], max_length)
    rows = [_row([examples[i] for i in members], max_length, pad_id) for members in bins]
    tokens = sum(len(e) for e in examples)
    logger.info(
        "packed %d examples into %d rows of %d tokens (%.1f%% filled, first-fit)",
        len(examples), len(rows), max_length, 100.0 * tokens / (len(rows) * max_length),
    )  # fmt: skip
    return rows


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of `capacity`, each item in the first bin with room.

    A segment tree holds the free space of n potential bins (n = number of items); bins not yet
    opened are full-capacity leaves to the right of every opened one, so "the leftmost leaf with
    room" is either the first opened bin that fits or the next new bin.
    """
    n = len(lengths)
    size = 1
    while size < n:
        size *= 2
    free = [0] * (2 * size)  # free[node] = the most free space of any bin under node
    for leaf in range(n):
        free[size + leaf] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for item, length in enumerate(lengths):
        node = 1
        while node < size:  # descend to the leftmost leaf with room (the root always has some)
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        leaf = node - size
        if leaf == len(bins):
            bins.append([])
        bins[leaf].append(item)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def _row(examples: list[SequenceExample], max_length: int, pad_id: int) -> PackedRow:
    input_ids: list[int] = []
    loss_mask: list[int] = []
    positions: list[int] = []
    for e in examples:
        input_ids += e.prompt_ids + e.response_ids
        loss_mask += [0] * len(e.prompt_ids) + list(e.loss_mask)
        positions += list(range(len(e)))
    padding = max_length - len(input_ids)
    return PackedRow(
        input_ids + [pad_id] * padding,
        loss_mask + [0] * padding,
        positions + list(range(padding)),
        tuple(len(e) for e in examples),
        tuple(e.where for e in examples),
    )
