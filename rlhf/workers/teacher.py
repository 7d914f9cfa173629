"""The distillation teacher: a frozen causal LM that scores response positions with its token distribution.

What ships back per response position (rlhf.algorithms.token_support): the log-probabilities of the
teacher's top-k tokens, their ids, and the log of the remaining mass as a tail bucket, so a 150k
vocabulary costs 2k + 1 numbers per token instead of V; with ``top_k = 0`` or ``top_k >= V`` (a
small vocabulary) the full ``[B, R, V]`` log-probabilities ship and the losses are exact.

No optimizer (like the reference model): each actor holds the whole teacher, so teacher actors
need no collective and can be colocated with other roles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.algorithms.token_support import teacher_support
from rlhf.data.batch import RolloutBatch
from rlhf.models.logprobs import response_logits
from rlhf.workers.frozen import FrozenModelWorker
from rlhf.workers.group import dispatch

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
        counts = self._hold_causal_lm(model_path)
        weight = self._require_model().get_output_embeddings().weight
        return {**counts, "vocab_size": int(getattr(weight, "ds_shape", weight.shape)[0])}

    @dispatch("split_dp", collect="list")
    def compute_support(self, batch: RolloutBatch, top_k: int, temperature: float = 1.0) -> TeacherSupport:
        """The teacher's top-k (+ tail) or full distribution at every response position of this shard."""
        model = self._require_model()

        def support(micro: RolloutBatch) -> tuple[Tensor, Tensor | None]:
            logprobs, ids = teacher_support(response_logits(model, micro), top_k=top_k, temperature=temperature)
            return logprobs.cpu(), None if ids is None else ids.to(torch.int32).cpu()

        logprobs, token_ids = zip(
            *(out for _, out in self._forward_micro_batches(batch, support))
        )  # rows in order: padded
        return TeacherSupport(
            logprobs=torch.cat(logprobs),
            token_ids=None if token_ids[0] is None else torch.cat(token_ids),  # type: ignore[arg-type]
        )
