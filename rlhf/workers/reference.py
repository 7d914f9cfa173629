"""The reference policy: a frozen copy of the initial policy that scores responses for the KL term.

No optimizer and no DeepSpeed: a plain torch forward in eval mode. Each actor holds the full model,
so reference actors need no collective and can be colocated with other roles.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from rlhf.data.batch import RolloutBatch
from rlhf.models.loading import load_causal_lm
from rlhf.models.logprobs import response_logprobs
from rlhf.workers.frozen import FrozenModelWorker
from rlhf.workers.group import dispatch
from rlhf.workers.trainable import device_chunks

logger = logging.getLogger(__name__)


class ReferenceWorker(FrozenModelWorker):
    """Frozen causal LM; `compute_logprobs` only."""

    @dispatch("broadcast", collect="first")
    def init_model(self, model_path: str) -> dict[str, int]:
        """Load the frozen model (the policy's initial checkpoint, LoRA-free)."""
        model = load_causal_lm(
            model_path,
            dtype=self.model_cfg.dtype,
            trust_remote_code=self.model_cfg.trust_remote_code,
            use_safetensors=self.model_cfg.use_safetensors,
        )
        model.requires_grad_(False)
        self.model = model.eval().to(self.device)
        return {"num_parameters": sum(p.numel() for p in model.parameters())}

    @dispatch("split_dp", collect="concat")
    def compute_logprobs(self, batch: RolloutBatch, temperature: float = 1.0) -> Tensor:
        """Reference logprobs [B, R] of the response tokens, softmax at `temperature` (the policy's)."""
        if self.model is None:
            raise RuntimeError(f"{self.role} rank {self.rank}: call init_model first")
        parts = []
        with torch.no_grad():
            for micro in device_chunks(batch, self.micro_batch_size, self.device):
                logprobs, _ = response_logprobs(self.model, micro, temperature=temperature)
                parts.append(logprobs.float().cpu())
        return torch.cat(parts) if parts else torch.zeros(0, batch.response_ids.shape[1])
