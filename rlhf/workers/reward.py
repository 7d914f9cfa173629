"""A sequence-classification reward model (num_labels=1) that scores whole responses.

The score is the head's output at the last real token of each sequence, found from the attention
mask, not from pad_token_id: with pad == eos (common) the HF pooling would skip a final EOS.
Rule-based rewards run in the driver and need no worker.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from rlhf.data.batch import RolloutBatch
from rlhf.models.loading import load_sequence_scorer
from rlhf.models.logprobs import last_token_scores
from rlhf.workers.frozen import FrozenModelWorker
from rlhf.workers.group import dispatch

logger = logging.getLogger(__name__)


class RewardWorker(FrozenModelWorker):
    """Hosts AutoModelForSequenceClassification(num_labels=1); `score` returns [B]."""

    @dispatch("broadcast", collect="first")
    def init_model(self, model_path: str) -> dict[str, int]:
        """Load the reward model; it must have a `score` head with one output. Collective under zero_stage 3."""
        zero3_config = self._zero3_config()
        model = load_sequence_scorer(
            model_path,
            dtype=self.model_cfg.dtype,
            trust_remote_code=self.model_cfg.trust_remote_code,
            zero3_config=zero3_config,
        )
        return self._hold(model, zero3_config)

    @dispatch("split_dp", collect="concat")
    def score(self, batch: RolloutBatch) -> Tensor:
        """Reward [B] per sequence: the head at the last real token of prompt + response."""
        model = self._require_model()
        return self._forward_in_row_order(batch, lambda micro: last_token_scores(model, micro), empty=torch.zeros(0))
