"""Shared set-up of the actors that host a frozen model (reference, reward): no optimizer, no DeepSpeed."""

from __future__ import annotations

import torch

from rlhf.config import ClusterConfig, ModelConfig
from rlhf.workers.group import Worker


class FrozenModelWorker(Worker):
    """Holds the model config, the device and the micro-batch size; subclasses load `self.model`."""

    def __init__(self, model_cfg: ModelConfig, cluster_cfg: ClusterConfig, *, micro_batch_size: int = 8):
        super().__init__()
        self.model_cfg = model_cfg
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if cluster_cfg.device == "cuda" else torch.device("cpu")
        )
        self.micro_batch_size = micro_batch_size
        self.model: torch.nn.Module | None = None
