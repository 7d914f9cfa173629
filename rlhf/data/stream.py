"""An endless, seeded, resumable stream of prompt batches.

Its whole state is (epoch, position): saving those two numbers and the seed is enough to
continue exactly where a run stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PromptBatch:
    token_ids: list[list[int]]
    texts: list[str]
    metadata: list[dict[str, Any]]


class PromptStream:
    def __init__(
        self,
        token_ids: list[list[int]],
        texts: list[str],
        metadata: list[dict[str, Any]],
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
    ):
        if not token_ids:
            raise ValueError("PromptStream needs at least one prompt")
        self.token_ids, self.texts, self.metadata = token_ids, texts, metadata
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.token_ids)))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.token_ids), generator=generator).tolist()

    def next_batch(self) -> PromptBatch:
        rows: list[int] = []
        while len(rows) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(rows), len(self._order) - self.position)
            rows.extend(self._order[self.position : self.position + take])
            self.position += take
        return PromptBatch(
            token_ids=[self.token_ids[i] for i in rows],
            texts=[self.texts[i] for i in rows],
            metadata=[self.metadata[i] for i in rows],
        )

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
