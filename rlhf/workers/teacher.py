"""The distillation teacher: a frozen causal LM that scores response positions with its token distribution.

What ships back per response position (rlhf.algorithms.token_support): the log-probabilities of the
teacher's top-k tokens, their ids, and the log of the remaining mass as a tail bucket, so a 150k
vocabulary costs 2k + 1 numbers per token instead of V; with ``top_k = 0`` or ``top_k >= V`` (a
small vocabulary) the full ``[B, R, V]`` log-probabilities ship and the losses are exact.

No optimizer and no DeepSpeed (like the reference model): each actor holds the whole teacher, so
teacher actors need no collective and can be colocated with other roles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.algorithms.token_support import teacher_support
from rlhf.data.batch import RolloutBatch
from rlhf.models.loading import load_causal_lm
from rlhf.models.logprobs import response_logits
from rlhf.workers.frozen import FrozenModelWorker
from rlhf.workers.group import dispatch
from rlhf.workers.trainable import device_chunks

logger = logging.getLogger(__name__)


@dataclass
class TeacherSupport:
    """The teacher's distributions for a batch's response positions (rows aligned with the batch)."""

    logprobs: Tensor
    """[B, R, k + 1] log-probabilities of the top-k tokens and the tail bucket (last), or [B, R, V] in full."""
    token_ids: Tensor | None
    """[B, R, k] ids of the top-k tokens (int32), or None when `logprobs` is the full distribution."""

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    @staticmethod
    def concat(parts: list[TeacherSupport]) -> TeacherSupport:
        """Rows of data-parallel shards back in order (shards of one batch share R)."""
        ids = [p.token_ids for p in parts]
        return TeacherSupport(
            logprobs=torch.cat([p.logprobs for p in parts]),
            token_ids=None if any(i is None for i in ids) else torch.cat(ids),  # type: ignore[arg-type]
        )


class TeacherWorker(FrozenModelWorker):
    """Frozen teacher LM; `compute_support` only."""

    @dispatch("broadcast", collect="first")
    def init_model(self, model_path: str) -> dict[str, int]:
        """Load the teacher; returns {"num_parameters", "vocab_size"} (the width of its logits)."""
        model = load_causal_lm(
            model_path,
            dtype=self.model_cfg.dtype,
            trust_remote_code=self.model_cfg.trust_remote_code,
            use_safetensors=self.model_cfg.use_safetensors,
        )
        model.requires_grad_(False)
        self.model = model.eval().to(self.device)
        return {
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        }

    @dispatch("split_dp", collect="list")
    def compute_support(self, batch: RolloutBatch, top_k: int, temperature: float = 1.0) -> TeacherSupport:
        """The teacher's top-k (+ tail) or full distribution at every response position of this shard."""
        if self.model is None:
            raise RuntimeError(f"{self.role} rank {self.rank}: call init_model first")
        logprobs, token_ids = [], []
        with torch.no_grad():
            for micro in device_chunks(batch, self.micro_batch_size, self.device):
                support, ids = teacher_support(response_logits(self.model, micro), top_k=top_k, temperature=temperature)
                logprobs.append(support.cpu())
                token_ids.append(None if ids is None else ids.to(torch.int32).cpu())
        return TeacherSupport(
            logprobs=torch.cat(logprobs),
            token_ids=None if token_ids[0] is None else torch.cat(token_ids),  # type: ignore[arg-type]
        )
