"""Shared set-up of the actors that host a frozen model (reference, reward): no optimizer, no DeepSpeed."""

from __future__ import annotations

from typing import Optional

import torch

from rlhf.config import ClusterConfig, ModelConfig
from rlhf.data.batch import RolloutBatch
from rlhf.data.token_budget import MicroBatch
from rlhf.workers.group import Worker
from rlhf.workers.trainable import micro_batches


class FrozenModelWorker(Worker):
    """Holds the model config, the device and the micro-batch size or token budget; subclasses load `self.model`."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cluster_cfg: ClusterConfig,
        *,
        micro_batch_size: int = 8,
        max_tokens_per_micro_batch: Optional[int] = None,
    ):
        """`max_tokens_per_micro_batch`: packed micro-batches of that many real tokens (None or 0: padded rows)."""
        super().__init__()
        self.model_cfg = model_cfg
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if cluster_cfg.device == "cuda" else torch.device("cpu")
        )
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.model: torch.nn.Module | None = None

    def _micro_batches(self, batch: RolloutBatch) -> list[tuple[list[int], MicroBatch]]:
        """`batch` in micro-batches on this worker's device (rlhf.workers.trainable.micro_batches)."""
        field = f"{self.role}.max_tokens_per_micro_batch"
        return micro_batches(batch, self.micro_batch_size, self.max_tokens_per_micro_batch, self.device, field=field)
