"""The student of knowledge distillation: PolicyWorker's DeepSpeed engine with a distillation update.

Loss of one micro-batch, with S and T the student's and teacher's distributions on the teacher's
shipped support (top-k + tail bucket, or the full vocabulary; rlhf.algorithms.token_support):

    loss = DISTILLATION_LOSSES[distill.loss](log S, log T, mask, beta=distill.beta, agg=algorithm.loss_agg,
                                             global counts of the minibatch)

The temperature is applied once, when both supports are built, so the loss runs at temperature 1.
Minibatches, micro-batches and the share-of-global-loss scheme are PolicyWorker's
(rlhf.workers.trainable): one optimizer step per train_batch_size rows.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from rlhf.algorithms import DISTILLATION_LOSSES, count_tokens
from rlhf.algorithms.token_support import student_support
from rlhf.config import DistillConfig
from rlhf.data.batch import RolloutBatch
from rlhf.errors import DataError
from rlhf.models.logprobs import response_logits
from rlhf.workers.group import dispatch
from rlhf.workers.policy import PolicyWorker
from rlhf.workers.trainable import StepStats, device_chunks


def loss_mask(batch: RolloutBatch) -> Tensor:
    """Tokens that carry the loss: the batch's loss_mask when the data set one, else every response token."""
    mask = getattr(batch, "loss_mask", None)
    return batch.response_mask if mask is None else mask


class DistillPolicyWorker(PolicyWorker):
    """One data-parallel rank of the student."""

    def __init__(self, *args: Any, distill_cfg: DistillConfig, **kwargs: Any):
        """`distill_cfg`: the loss, its beta and temperature; the other arguments are PolicyWorker's."""
        super().__init__(*args, **kwargs)
        DISTILLATION_LOSSES.check(distill_cfg.loss, "distill.loss")
        self.distill_cfg = distill_cfg
        self.distill_loss = DISTILLATION_LOSSES.get(distill_cfg.loss)

    @dispatch("rank0", collect="first")
    def vocab_size(self) -> int:
        """The student's vocabulary size (its config's), compared with the teacher's before training."""
        return int(self.hf_config.vocab_size)

    @dispatch("split_dp", collect="mean")
    def distill_update(
        self, batch: RolloutBatch, teacher_logprobs: Tensor, teacher_ids: Optional[Tensor]
    ) -> dict[str, float]:
        """One pass over this rank's shard in minibatches of train_batch_size / dp rows; global stats `distill/...`.

        `teacher_logprobs` [B, R, K] and `teacher_ids` [B, R, k] (or None) are a TeacherSupport's
        fields for the same rows (split along dim 0 with the batch).
        """
        engine = self._require_engine()
        _check_rows(batch, teacher_logprobs, teacher_ids)
        engine.train()
        skipped_before = engine.nonfinite.total
        stats = StepStats()
        rows = engine.minibatch_rows
        for index, minibatch in enumerate(self._minibatches(batch, epochs=1)):
            start = index * rows
            tokens, seqs = self._global_counts(loss_mask(minibatch))
            size = self.train_cfg.micro_batch_size
            for offset, micro in zip(range(0, rows, size), device_chunks(minibatch, size, engine.device)):
                lo, hi = start + offset, start + offset + len(micro)
                teacher = teacher_logprobs[lo:hi].to(engine.device)
                ids = None if teacher_ids is None else teacher_ids[lo:hi].to(engine.device)
                loss, loss_stats = self._micro_batch_distill_loss(micro, teacher, ids, tokens, seqs)
                engine.backward(loss)
                engine.step()
                for key, value in loss_stats.items():
                    stats.add_share(key, value)
            stats.minibatches += 1
            self._optimizer_step_stats(stats, "distill")
        return self._update_metrics(stats, "distill", skipped_before)

    def _micro_batch_distill_loss(
        self, micro: RolloutBatch, teacher: Tensor, ids: Optional[Tensor], tokens: Tensor, seqs: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = response_logits(self._require_engine(), micro)
        student = student_support(logits, ids, temperature=self.distill_cfg.temperature)
        return self.distill_loss(
            student,
            teacher,
            loss_mask(micro),
            temperature=1.0,
            beta=self.distill_cfg.beta,
            agg=self.algo_cfg.loss_agg,
            global_tokens=tokens,
            global_seqs=seqs,
            constant_normalizer=self.constant_normalizer,
        )

    @dispatch("split_dp", collect="list")
    def divergence_sums(self, batch: RolloutBatch, teacher_logprobs: Tensor, teacher_ids: Optional[Tensor]) -> Tensor:
        """[forward KL sum, reverse KL sum, real tokens] of this shard under the current weights (no grad).

        Measured on the shipped support at distill.temperature; sum the ranks' rows and divide by
        the token count for the per-token means.
        """
        engine = self._require_engine()
        _check_rows(batch, teacher_logprobs, teacher_ids)
        engine.eval()
        totals = torch.zeros(3, device=engine.device)
        size = self.train_cfg.micro_batch_size
        with torch.no_grad():
            for start, micro in zip(range(0, len(batch), size), device_chunks(batch, size, engine.device)):
                hi = start + len(micro)
                teacher = teacher_logprobs[start:hi].to(engine.device)
                ids = None if teacher_ids is None else teacher_ids[start:hi].to(engine.device)
                student = student_support(response_logits(engine, micro), ids, temperature=self.distill_cfg.temperature)
                mask = loss_mask(micro)
                for column, kind in enumerate(("forward_kl", "reverse_kl")):
                    # token_mean over a global count of 1 is the masked sum of the per-token divergences
                    total, _ = DISTILLATION_LOSSES.get(kind)(student, teacher, mask, global_tokens=1.0)
                    totals[column] += total
                totals[2] += count_tokens(mask).to(totals.device)
        return totals.cpu()


def _check_rows(batch: RolloutBatch, teacher_logprobs: Tensor, teacher_ids: Optional[Tensor]) -> None:
    expected = tuple(batch.response_ids.shape)
    if tuple(teacher_logprobs.shape[:2]) != expected or (
        teacher_ids is not None and tuple(teacher_ids.shape[:2]) != expected
    ):
        raise DataError(
            f"teacher distributions of shape {tuple(teacher_logprobs.shape)} do not match the batch's responses "
            f"{expected}; score the same batch with TeacherWorker.compute_support"
        )
