"""Batches by token budget: packed micro-batches and token-balanced data-parallel shards (pure; no Ray, no DeepSpeed).

A role with `max_tokens_per_micro_batch` set runs its forward and backward passes on packed
micro-batches instead of `micro_batch_size` padded rows:

- `token_budget_bins` groups a shard's rows first-fit decreasing (rlhf.data.packing.first_fit on
  the lengths sorted longest first) into bins of at most that many real tokens (prompt +
  response, padding not counted);
- `pack_rows` concatenates a bin's real tokens into one row whose position ids restart at 0 at
  each sequence, the layout transformers turns into block-diagonal causal attention (see
  rlhf.models.logprobs.forward_inputs), and records where each response token's outputs sit, so
  `PackedMicroBatch.unpack` maps per-token outputs back to the rows' `[b, R]` layout;
- `spread_bins` splits the fullest bins until a rank has as many micro-batches as the rank with
  the most (the workers all-reduce the count): ZeRO-3 gathers parameters in every forward and
  ZeRO-2/3 reduce gradients in every backward, so every rank must run the same number of them.

Data-parallel ranks get balanced token counts, not only equal row counts: `dp_shard_order` cuts
each minibatch (the rows of one optimizer step) into `parts` groups of equal row count with
balanced real tokens (`balanced_partition`, greedy longest first), keeping every row in the
minibatch it belongs to, so the optimizer steps see the same rows as with the plain split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from rlhf.data.batch import RolloutBatch
from rlhf.data.packing import first_fit
from rlhf.errors import DataError

# -- plans over lengths --------------------------------------------------------------------------


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins of `capacity`: longest first, each into the first bin with room.

    Bins come in the order they were opened; the indices inside a bin ascend. Every length must
    be <= capacity.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins = first_fit([lengths[i] for i in order], capacity)
    return [sorted(order[j] for j in members) for members in bins]


def token_budget_bins(lengths: Sequence[int], max_tokens: int, *, field: str) -> list[list[int]]:
    """`first_fit_decreasing` into bins of `max_tokens`; DataError naming `field` for a longer row."""
    for row, length in enumerate(lengths):
        if length > max_tokens:
            raise DataError(
                f"row {row} has {length} tokens (prompt + response), more than {field}={max_tokens}; "
                f"raise {field} to at least data.max_prompt_length + rollout.sampling.max_new_tokens"
            )
    return first_fit_decreasing(lengths, max_tokens)


def spread_bins(bins: list[list[int]], lengths: Sequence[int], count: int) -> list[list[int]]:
    """`bins` split until there are `count`: each time the bin with the most tokens among those
    holding two or more items is halved, greedy longest first (ties: the earlier bin). The two
    halves take its place, in that order. ValueError when there are fewer items than `count`."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [i for i, b in enumerate(bins) if len(b) > 1]
        if not splittable:
            raise ValueError(f"cannot make {count} non-empty bins out of {sum(map(len, bins))} items")
        fullest = max(splittable, key=lambda i: (sum(lengths[j] for j in bins[i]), -i))
        first, second = balanced_partition([lengths[j] for j in bins[fullest]], 2, equal_rows=False)
        members = bins[fullest]
        bins[fullest : fullest + 1] = [[members[j] for j in first], [members[j] for j in second]]
    return bins


def balanced_partition(lengths: Sequence[int], parts: int, *, equal_rows: bool = True) -> list[list[int]]:
    """Indices of `lengths` in `parts` groups with balanced sums: longest first, each into the group
    with the smallest sum (ties: fewer items, then the lower group) among those not yet full.

    `equal_rows`: every group gets len(lengths) / parts items (which must divide); else groups
    take any number. Indices inside a group ascend.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if equal_rows and len(lengths) % parts:
        raise ValueError(f"{len(lengths)} items cannot be split into {parts} groups of equal size")
    size = len(lengths) // parts if equal_rows else len(lengths)
    groups: list[list[int]] = [[] for _ in range(parts)]
    sums = [0] * parts
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        open_groups = [g for g in range(parts) if len(groups[g]) < size]
        g = min(open_groups, key=lambda g: (sums[g], len(groups[g]), g))
        groups[g].append(i)
        sums[g] += lengths[i]
    return [sorted(g) for g in groups]


def dp_shard_order(lengths: Sequence[int], parts: int, minibatch_rows: Optional[int] = None) -> list[int]:
    """A row order whose `parts` equal contiguous shards are token-balanced, minibatch by minibatch.

    The plain split gives rank r rows [r·S, (r+1)·S) (S = n / parts), and its k-th minibatch of
    m = `minibatch_rows` rows is rows r·S + k·m … r·S + (k+1)·m - 1, so optimizer step k trains on
    those rows of every rank. Here the same rows of step k are re-dealt among the ranks with
    `balanced_partition`: every step keeps its rows and its row count per rank, and each rank
    gets about the same number of real tokens. Without `minibatch_rows`, or when it does not
    divide S, the whole shard is one minibatch. The result lists rank 0's rows, then rank 1's, ...
    """
    n = len(lengths)
    if n % parts:
        raise ValueError(f"{n} rows cannot be split into {parts} equal shards")
    shard = n // parts
    rows = minibatch_rows if minibatch_rows and shard % minibatch_rows == 0 else shard
    shards: list[list[int]] = [[] for _ in range(parts)]
    for k in range(shard // rows if rows else 0):
        block = [r * shard + k * rows + i for r in range(parts) for i in range(rows)]
        for r, group in enumerate(balanced_partition([lengths[j] for j in block], parts)):
            shards[r] += [block[j] for j in group]
    return [row for rows_of_rank in shards for row in rows_of_rank]


def inverse_order(order: Sequence[int]) -> list[int]:
    """The permutation that puts rows listed in `order` back where they came from: x[order][inverse] == x."""
    inverse = [0] * len(order)
    for position, row in enumerate(order):
        inverse[row] = position
    return inverse


# -- packed tensors ------------------------------------------------------------------------------


def sequence_lengths(batch: RolloutBatch) -> list[int]:
    """Real tokens of each row: prompt + response, padding not counted."""
    return (batch.prompt_mask.bool().sum(1) + batch.response_mask.bool().sum(1)).tolist()


@dataclass
class PackedMicroBatch:
    """Rows of a RolloutBatch packed into one row of their real tokens.

    `inputs` is that row in rlhf.data.collate.collate_packed's layout (its first token as the
    prompt, the rest as the response, explicit positions restarting at 0 per sequence), for the
    model forward. Response token j of row i (a real token) sits at packed position
    `start_i + p_i + j` (p_i real prompt tokens), so the outputs at `start_i + p_i + j - 1` predict
    it (logits) or value the state before it (critic): `response_index`. `rows` keeps the rows'
    own `[b, R]` fields (old logprobs, advantages, ...) for the loss.
    """

    rows: RolloutBatch
    """The b packed rows in their padded layout."""
    inputs: RolloutBatch
    """One packed row [1, L] of every real token (L = the rows' real tokens)."""
    response_index: Tensor
    """[N] packed position whose outputs belong to each real response token (N = real response tokens)."""
    response_rows: Tensor
    """[N] row of each real response token (row-major order)."""
    response_cols: Tensor
    """[N] its column in the rows' [b, R] layout."""
    last_index: Tensor
    """[b] packed position of each row's last real token (a sequence classifier's score)."""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return self.inputs.input_ids.shape[1]

    @property
    def response_ids(self) -> Tensor:
        """[N] the real response tokens, in `response_index` order (the labels of the logits there)."""
        return self.rows.response_ids[self.response_rows, self.response_cols]

    def unpack(self, values: Tensor) -> Tensor:
        """[N, ...] per-response-token outputs → [b, R, ...], zero at padding (differentiable)."""
        shape = (len(self.rows), self.rows.response_ids.shape[1], *values.shape[1:])
        return values.new_zeros(shape).index_put((self.response_rows, self.response_cols), values)

    def to(self, device: torch.device | str) -> PackedMicroBatch:
        return PackedMicroBatch(
            rows=self.rows.to(device),
            inputs=self.inputs.to(device),
            response_index=self.response_index.to(device),
            response_rows=self.response_rows.to(device),
            response_cols=self.response_cols.to(device),
            last_index=self.last_index.to(device),
        )


MicroBatch = Union[RolloutBatch, PackedMicroBatch]
"""What a forward pass takes: padded rows or a packed micro-batch."""


def rows_of(micro: MicroBatch) -> RolloutBatch:
    """The micro-batch's rows in the padded [b, R] layout (old logprobs, advantages, masks, ...)."""
    return micro.rows if isinstance(micro, PackedMicroBatch) else micro


def pack_rows(rows: RolloutBatch) -> PackedMicroBatch:
    """Pack every row's real tokens (prompt_mask / response_mask) into one row; see PackedMicroBatch.

    Responses must be right-padded (response_mask a prefix of ones) and every prompt must have a
    real token, as rollout batches are: then each response token's outputs are the padded
    computation's (the padded layout attends to real tokens only, at positions that skip padding).
    """
    if rows.positions is not None:
        raise ValueError("pack_rows takes padded rows; this batch is packed already (positions set)")
    response_mask = rows.response_mask.bool()
    prefix = response_mask.long().cumprod(dim=1).bool()
    if not torch.equal(prefix, response_mask):
        row = int((prefix != response_mask).any(dim=1).nonzero()[0])
        raise DataError(f"row {row}: response_mask has a gap; packed micro-batches need right-padded responses")
    prompt_tokens = rows.prompt_mask.bool().sum(dim=1)
    if len(rows) and int(prompt_tokens.min()) < 1:
        row = int((prompt_tokens < 1).nonzero()[0])
        raise DataError(f"row {row} has no prompt token; a packed micro-batch needs one to predict the response from")
    mask = rows.attention_mask.bool()
    input_ids = rows.input_ids[mask].unsqueeze(0)
    positions = rows.position_ids[mask].unsqueeze(0)
    packed_index = mask.flatten().long().cumsum(0).view_as(mask) - 1  # packed position of each real token
    response_rows, response_cols = response_mask.nonzero(as_tuple=True)
    response_index = packed_index[:, rows.prompt_length :][response_mask] - 1
    last_index = mask.sum(dim=1).cumsum(0) - 1
    ones = torch.ones_like(input_ids)
    inputs = RolloutBatch(
        prompt_ids=input_ids[:, :1],
        prompt_mask=ones[:, :1],
        response_ids=input_ids[:, 1:],
        response_mask=ones[:, 1:],
        positions=positions,
    )
    return PackedMicroBatch(rows, inputs, response_index, response_rows, response_cols, last_index)


def restore_row_order(parts: Sequence[Tensor], rows: Sequence[Sequence[int]]) -> Tensor:
    """torch.cat(parts) with part i's entries at batch rows `rows[i]` put back in batch order."""
    order = torch.as_tensor([row for part in rows for row in part], dtype=torch.long)
    return torch.cat(list(parts))[torch.as_tensor(inverse_order(order.tolist()), dtype=torch.long)]
