"""Batches of offline examples, epoch after epoch, in a seeded order that a checkpoint can resume exactly."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from rlhf.data.batch import RolloutBatch
from rlhf.errors import CheckpointError, DataError

T = TypeVar("T")


class OfflineLoader(Generic[T]):
    """Fixed-size batches of `examples` (each epoch a fresh seeded permutation when `shuffle`).

    `batch_size` counts examples (a batch of pairs collates to twice as many rows). The last
    incomplete batch of an epoch is skipped, so every batch has the same size, which the
    data-parallel split needs; with shuffling a different tail is skipped each epoch. The order
    of epoch e depends only on (seed, e), so `state()` (epoch, batches taken) is all a
    checkpoint needs to continue with exactly the next batch.
    """

    def __init__(
        self,
        examples: Sequence[T],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        collate: Callable[[list[T]], RolloutBatch],
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(examples) < batch_size:
            raise DataError(
                f"the dataset has {len(examples)} examples, fewer than one batch of {batch_size}; "
                "lower the batch size or add data"
            )
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.collate = collate
        self.epoch = 0
        self.batch = 0  # batches already taken in this epoch
        self._order = self._epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> RolloutBatch:
        """The next batch, moving on to the next epoch after the last full batch of this one."""
        if self.batch == self.batches_per_epoch:
            self.epoch += 1
            self.batch = 0
            self._order = self._epoch_order(self.epoch)
        start = self.batch * self.batch_size
        rows = [self.examples[i] for i in self._order[start : start + self.batch_size]]
        self.batch += 1
        return self.collate(rows)

    def epoch_batches(self) -> Iterator[RolloutBatch]:
        """The batches left in the current epoch (all of them at an epoch's start)."""
        while self.batch < self.batches_per_epoch:
            yield self.next_batch()

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores to resume at the next batch."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "batch_size": self.batch_size,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state()`; the dataset, batch size and seed must be the ones it was saved with."""
        saved = (state["num_examples"], state["batch_size"], state["seed"])
        if saved != (len(self.examples), self.batch_size, self.seed):
            raise CheckpointError(
                f"the checkpoint's data loader ran over {saved[0]} examples in batches of {saved[1]} with seed "
                f"{saved[2]}, this run has {len(self.examples)}, {self.batch_size} and {self.seed}; resume with "
                "the same data, batch size and seed, or start a new run"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._order = self._epoch_order(self.epoch)
