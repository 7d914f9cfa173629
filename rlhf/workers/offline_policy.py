"""Offline training on DeepSpeed ranks: one optimizer step per call, any registered objective.

    train_step(shard, aux):                  # this rank's rows of one global minibatch
        counts = all_reduce(objective.local_counts(shard))
        state  = objective.begin_minibatch(...)                    # e.g. KTO's KL reference point
        for micro in shard.chunks(micro_batch_size × rows_per_example):
            engine.backward(objective.micro_loss(micro, counts, ...)); engine.step()

Batch sizes count examples (rlhf.config.OfflineConfig): a rank's shard of one step is
train_batch_size / dp examples = that × rows_per_example rows, and the micro-batches are exactly
DeepSpeed's gradient-accumulation steps. The shares of every micro-batch on every rank sum to the
minibatch loss, so the update does not depend on dp or the micro-batch size (trainable.py).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from rlhf.config import ClusterConfig, ModelConfig, OfflineConfig, TrainConfig
from rlhf.data.batch import RolloutBatch
from rlhf.errors import ConfigError
from rlhf.workers.group import dispatch
from rlhf.workers.objectives import OBJECTIVES, Objective
from rlhf.workers.policy import CausalLMWorker
from rlhf.workers.trainable import StepStats, TrainableWorker

logger = logging.getLogger(__name__)


class OfflineTrainableWorker(TrainableWorker):
    """`train_step` and `evaluate` for any objective (offline.objective); subclasses load the model."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        offline_cfg: OfflineConfig,
        cluster_cfg: ClusterConfig,
        seed: int = 0,
    ):
        """`offline_cfg.objective` picks the loss (rlhf.workers.objectives.OBJECTIVES)."""
        super().__init__(model_cfg, train_cfg, cluster_cfg, seed)
        self.objective: Objective = OBJECTIVES.get(offline_cfg.objective)(offline_cfg)

    def _forward_model(self) -> Any:
        """What the objective calls for its forward pass (the engine, so ZeRO hooks and bf16 apply)."""
        return self._require_engine()

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        tensor = tensor.to(self._require_engine().device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    @dispatch("split_dp", collect="first")
    def train_step(self, batch: RolloutBatch, aux: Optional[Tensor] = None) -> dict[str, float]:
        """One optimizer step on this rank's shard of a global minibatch; returns global stats (every rank)."""
        engine = self._require_engine()
        examples = self.train_cfg.train_batch_size // self.world_size
        rows = examples * self.objective.rows_per_example
        if len(batch) != rows:
            raise ConfigError(
                f"{self.role}: a rank's shard has {len(batch)} rows, expected train_batch_size "
                f"{self.train_cfg.train_batch_size} / dp {self.world_size} = {examples} examples × "
                f"{self.objective.rows_per_example} rows each = {rows}; send whole minibatches"
            )
        engine.train()
        skipped_before = engine.nonfinite.total
        stats = StepStats()
        self._minibatch(batch, aux, stats, train=True)
        self._optimizer_step_stats(stats, "train")
        return self._update_metrics(stats, "train", skipped_before)

    @dispatch("split_dp", collect="first")
    def evaluate(self, batch: RolloutBatch, aux: Optional[Tensor] = None) -> dict[str, float]:
        """The objective's stats on held-out rows, no gradient; `count` is the global first count
        (tokens for PT/SFT, pairs, labelled KTO examples) for weighting several evaluate calls."""
        engine = self._require_engine()
        engine.eval()
        stats = StepStats()
        with torch.no_grad():
            counts = self._minibatch(batch, aux, stats, train=False)
        values = stats.reduce(self.world_size, engine.device)
        values["count"] = float(counts[0])
        return values

    def _minibatch(self, batch: RolloutBatch, aux: Optional[Tensor], stats: StepStats, *, train: bool) -> Tensor:
        engine = self._require_engine()
        objective, model = self.objective, self._forward_model()
        batch = batch.to(engine.device)
        aux = aux.to(engine.device) if aux is not None else None
        micro_rows = self.train_cfg.micro_batch_size * objective.rows_per_example
        counts = self._all_reduce(objective.local_counts(batch))
        state = objective.begin_minibatch(model, batch, aux, self._all_reduce, micro_rows)
        for start in range(0, len(batch), micro_rows):
            micro = batch.select(slice(start, start + micro_rows))
            micro_aux = aux[start : start + micro_rows] if aux is not None else None
            loss, shares = objective.micro_loss(model, micro, micro_aux, counts, state)
            if train:
                engine.backward(loss)
                engine.step()
            for key, value in shares.items():
                stats.add_share(key, value)
        stats.minibatches += 1
        return counts


class OfflinePolicyWorker(OfflineTrainableWorker, CausalLMWorker):
    """A policy rank for the causal-LM offline objectives (PT, SFT, DPO family, KTO, ...).

    Loading, LoRA, checkpoints, `save_hf` and weight sync (online DPO) are CausalLMWorker's.
    """
