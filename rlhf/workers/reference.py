"""The reference policy: a frozen copy of the initial policy that scores responses for the KL term.

No optimizer: a forward in eval mode. With zero_stage 0 each actor holds the full model, needs no
collective and can be colocated with other roles; with zero_stage 3 the actors partition it
(rlhf.workers.frozen), so a reference larger than one device fits on several.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from rlhf.data.batch import RolloutBatch
from rlhf.models.logprobs import response_logprobs
from rlhf.workers.frozen import FrozenModelWorker
from rlhf.workers.group import dispatch

logger = logging.getLogger(__name__)


class ReferenceWorker(FrozenModelWorker):
    """Frozen causal LM; `compute_logprobs` only."""

    @dispatch("broadcast", collect="first")
    def init_model(self, model_path: str) -> dict[str, int]:
        """Load the frozen model (the policy's initial checkpoint, LoRA-free); collective under zero_stage 3."""
        return self._hold_causal_lm(model_path)

    @dispatch("split_dp", collect="concat")
    def compute_logprobs(self, batch: RolloutBatch, temperature: float = 1.0) -> Tensor:
        """Reference logprobs [B, R] of the response tokens, softmax at `temperature` (the policy's)."""
        model = self._require_model()
        return self._forward_in_row_order(
            batch,
            lambda micro: response_logprobs(model, micro, temperature=temperature)[0],
            empty=torch.zeros(0, batch.response_ids.shape[1]),
        )
