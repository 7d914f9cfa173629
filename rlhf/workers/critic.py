"""The critic: DeepSpeed training of a ValueModel (backbone + linear value head) with the clipped value loss.

`values[:, j]` is the value of the state before response token j: the head reads the hidden state
at full position P + j - 1 (see rlhf.models.value_model).

model.peft.method applies to the critic's backbone as to the policy (OpenRLHF trains LoRA critics
the same way), restricted to rlhf.models.peft_utils.SCALAR_HEAD_PEFT_METHODS; the value head
always trains in full. `save_hf` writes merged weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlhf.algorithms import value_loss
from rlhf.data.batch import RolloutBatch
from rlhf.data.token_budget import rows_of
from rlhf.models.peft_methods import check_scalar_head_peft
from rlhf.models.peft_utils import apply_peft
from rlhf.models.value_model import ValueModel, hf_name, response_values
from rlhf.workers.group import dispatch
from rlhf.workers.trainable import RLTrainableWorker, StepStats, forward_in_row_order, require_fields

logger = logging.getLogger(__name__)


class CriticWorker(RLTrainableWorker):
    """One data-parallel rank of the critic (arguments: RLTrainableWorker's)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        check_scalar_head_peft(self.model_cfg, "critic")

    def _load_model(self, model_path: str) -> ValueModel:
        """Backbone from `model_path` (a policy or critic checkpoint) and its value head, or a fresh one."""
        return ValueModel.from_pretrained(
            model_path, dtype=self.dtype, head_seed=self.seed, zero3_config=self._zero3_config()
        )

    def _apply_peft(self, model: ValueModel) -> ValueModel:
        model.backbone = apply_peft(model.backbone, self.model_cfg, task_type="FEATURE_EXTRACTION")
        return model

    @dispatch("split_dp", collect="concat")
    def compute_values(self, batch: RolloutBatch) -> Tensor:
        """Values [B, R] of the state before each response token (eval mode, no grad)."""
        engine = self._require_engine()
        engine.eval()
        return forward_in_row_order(
            self._micro_batches(batch),
            lambda micro: response_values(engine, micro),
            empty=torch.zeros(0, batch.response_ids.shape[1]),
        )

    @dispatch("split_dp", collect="mean")
    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """Clipped value-loss regression onto batch.returns (old values: batch.values); stats `critic/...`."""
        engine = self._require_engine()
        require_fields(self.role, batch, "values", "returns")
        algo = self.algo_cfg
        engine.train()
        skipped_before = engine.nonfinite.total
        stats = StepStats()
        for minibatch in self._minibatches(batch, algo.ppo_epochs):
            tokens, seqs = self._global_counts(minibatch.effective_loss_mask)
            micros = self._micro_batches(minibatch)
            for i, (_, micro) in enumerate(micros):
                rows = rows_of(micro)  # old values and returns in the [b, R] layout
                loss, loss_stats = value_loss(
                    response_values(engine, micro),
                    rows.values,
                    rows.returns,
                    rows.effective_loss_mask,  # multi-turn: the environment's tokens have no value target
                    clip_range=algo.value_clip,
                    agg=algo.loss_agg,
                    global_tokens=tokens,
                    global_seqs=seqs,
                    constant_normalizer=self.constant_normalizer,
                )
                engine.backward(loss, ends_step=i == len(micros) - 1)
                engine.step()
                stats.add_share("critic/loss", loss_stats.pop("critic/loss"))
                for key, value in loss_stats.items():
                    stats.add_mean(key, value)
            stats.minibatches += 1
            self._optimizer_step_stats(stats, "critic")
        return self._update_metrics(stats, "critic", skipped_before)

    @dispatch("broadcast", collect="first")
    def save_hf(self, directory: str) -> str:
        """Backbone checkpoint (adapters merged) plus value_head.* tensors (ValueModel.from_pretrained reads it back)."""
        engine = self._require_engine()
        engine.save_hf(directory, config=engine.module.config, rename=hf_name)
        return str(Path(directory))
