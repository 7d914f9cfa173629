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
from rlhf.errors import ConfigError
from rlhf.models.loading import DTYPES, resolve_model_path
from rlhf.models.logprobs import last_token_scores
from rlhf.workers.frozen import FrozenModelWorker
from rlhf.workers.group import dispatch
from rlhf.workers.trainable import forward_in_row_order

logger = logging.getLogger(__name__)


class RewardWorker(FrozenModelWorker):
    """Hosts AutoModelForSequenceClassification(num_labels=1); `score` returns [B]."""

    @dispatch("broadcast", collect="first")
    def init_model(self, model_path: str) -> dict[str, int]:
        """Load the reward model; it must have a `score` head with one output."""
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(model_path),
            num_labels=1,
            dtype=DTYPES[self.model_cfg.dtype],
            trust_remote_code=self.model_cfg.trust_remote_code,
        )
        head = getattr(model, "score", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
            raise ConfigError(
                f"reward model {model_path}: expected a sequence-classification model with a linear `score` "
                f"head of 1 output (num_labels=1), got {type(model).__name__}"
            )
        model.requires_grad_(False)
        self.model = model.eval().to(self.device)
        return {"num_parameters": sum(p.numel() for p in model.parameters())}

    @dispatch("split_dp", collect="concat")
    def score(self, batch: RolloutBatch) -> Tensor:
        """Reward [B] per sequence: the head at the last real token of prompt + response."""
        model = self.model
        if model is None:
            raise RuntimeError(f"{self.role} rank {self.rank}: call init_model first")
        return forward_in_row_order(
            self._micro_batches(batch), lambda micro: last_token_scores(model, micro), empty=torch.zeros(0)
        )
