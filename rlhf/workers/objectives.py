"""Offline training objectives: how one stage turns a micro-batch into its share of the minibatch loss.

An objective owns the forward pass it needs (token logprobs of a causal LM, or last-token scores
of a reward model) and calls a pure loss of rlhf.algorithms. The worker's loop
(rlhf.workers.offline_policy.OfflineTrainableWorker) is the same for every objective:

    counts = all_reduce(objective.local_counts(minibatch))        # global tokens / pairs / examples
    state  = objective.begin_minibatch(model, minibatch, aux, all_reduce)   # e.g. KTO's KL point
    for micro in minibatch.chunks(micro_batch_size × rows_per_example):
        loss_share, stat_shares = objective.micro_loss(model, micro, aux_micro, counts, state)

`loss_share` and every stat are *shares*: summed over the micro-batches of all ranks they give
the minibatch's value (a token mean with the global token count, or a per-example mean times
examples_in_micro / global_examples), so the gradient and the metrics do not depend on the
data-parallel layout or the micro-batch size.

Row layout (rlhf.data.collate): sequence objectives have one row per example; pair objectives
interleave rows (2i chosen, 2i+1 rejected of pair i); KTO interleaves (2i the labelled example,
2i+1 the mismatched prompt_i + response_{i+1} row, label -1). `aux` is an optional per-row
tensor [B] that the controller computes: the reference model's summed log-probabilities.

A new objective (distillation, say) is one subclass plus `@OBJECTIVES.register("name")`, and a
stage yaml that sets `offline.objective: name`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from rlhf.algorithms import (
    Registry,
    Stats,
    count_seqs,
    count_tokens,
    dpo_loss,
    kto_loss,
    orpo_loss,
    pairwise_reward_loss,
    sft_loss,
    simpo_loss,
)
from rlhf.config import OfflineConfig
from rlhf.data.batch import RolloutBatch
from rlhf.errors import DataError
from rlhf.models.logprobs import last_token_scores, response_logprobs

AllReduce = Callable[[Tensor], Tensor]
"""Sums a tensor over the data-parallel ranks (identity on one rank)."""


# -- forward passes ------------------------------------------------------------------------------


def loss_mask(batch: RolloutBatch) -> Tensor:
    """[B, R] bool: the tokens that carry a loss (`loss_mask`, else every response token)."""
    return batch.effective_loss_mask.bool()


def token_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0) -> Tensor:
    """[B, R] float32 log p(response token j | everything before it), softmax at `temperature`; packed rows included."""
    return response_logprobs(model, batch, temperature=temperature)[0]


def sequence_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, *, average: bool = False, temperature: float = 1.0
) -> Tensor:
    """[B] summed (or token-averaged) log-probabilities of each row's loss tokens."""
    mask = loss_mask(batch)
    logprobs = torch.where(mask, token_logprobs(model, batch, temperature), torch.zeros((), device=mask.device))
    total = logprobs.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


# -- the objective protocol ------------------------------------------------------------------------


class Objective:
    """One offline stage's loss; subclasses set the class attributes and `local_counts`/`micro_loss`."""

    example_kind: ClassVar[str] = "sequence"
    """Which collate builds its batches: sequence (PT/SFT), pair (RM, DPO family) or kto."""
    rows_per_example: ClassVar[int] = 1
    """Batch rows per example (2 for pairs and for KTO's labelled + mismatched rows)."""
    needs_reference: ClassVar[bool] = False
    """True: the controller passes the reference model's summed logprobs per row as `aux`."""
    model_kind: ClassVar[str] = "causal_lm"
    """causal_lm (rlhf.workers.offline_policy) or reward (rlhf.workers.reward_trainer)."""
    prefix: ClassVar[str] = ""
    """Namespace of this objective's metrics (`sft`, `dpo`, ...)."""
    headline: ClassVar[str] = "loss"
    """The metric (without prefix) that the progress bar shows."""

    def __init__(self, cfg: OfflineConfig, *, temperature: float = 1.0):
        self.cfg = cfg
        self.temperature = temperature
        """Softmax temperature of the policy's logprobs: 1 on a data set; online DPO's sampling temperature
        (rlhf.engines.rollout.logprob_temperature), so the loss sees the policy that sampled the pairs."""

    def local_counts(self, minibatch: RolloutBatch) -> Tensor:
        """1-D float tensor of this rank's counts; summed over ranks it is `counts` of `micro_loss`."""
        raise NotImplementedError

    def begin_minibatch(
        self,
        model: torch.nn.Module,
        minibatch: RolloutBatch,
        aux: Optional[Tensor],
        all_reduce: AllReduce,
        micro_rows: int,
    ) -> dict[str, Any]:
        """Minibatch-level quantities every micro-batch needs (collective: every rank calls it once).

        `micro_rows`: the rows one forward may take (for any extra no-grad pass).
        """
        return {}

    def micro_loss(
        self,
        model: torch.nn.Module,
        micro: RolloutBatch,
        aux: Optional[Tensor],
        counts: Tensor,
        state: dict[str, Any],
    ) -> tuple[Tensor, Stats]:
        """(loss share, stat shares) of one micro-batch; the loss is the stats' `<prefix>/loss`."""
        raise NotImplementedError


OBJECTIVES: Registry[type[Objective]] = Registry("offline objective")


def _share(stats: Stats, weight: Tensor) -> Stats:
    return {k: v * weight for k, v in stats.items()}


def _pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) halves of an interleaved per-row tensor."""
    return values[0::2], values[1::2]


def _require_pairs(batch: RolloutBatch) -> None:
    if len(batch) % 2:
        raise DataError(f"a preference batch must hold whole pairs (2 interleaved rows each), got {len(batch)} rows")


def _require_aux(name: str, aux: Optional[Tensor]) -> Tensor:
    if aux is None:
        raise DataError(f"objective {name!r} needs the reference log-probabilities of every row; none were passed")
    return aux


@OBJECTIVES.register("sft")
class SFTObjective(Objective):
    """Next-token NLL on the loss tokens (PT: every token; SFT: the response / assistant turns).

    loss = aggregate(-logprobs, loss_mask, offline.loss_agg) with the minibatch's global counts.
    Also the evaluation of both stages: `sft/loss` (token mean) and its exp, `sft/perplexity`.
    """

    prefix = "sft"

    def local_counts(self, minibatch: RolloutBatch) -> Tensor:
        mask = loss_mask(minibatch)
        return torch.stack([count_tokens(mask), count_seqs(mask)]).float()

    def micro_loss(self, model, micro, aux, counts, state):
        mask = loss_mask(micro)
        loss, stats = sft_loss(
            token_logprobs(model, micro, self.temperature),
            mask,
            agg=self.cfg.loss_agg,
            global_tokens=counts[0],
            global_seqs=counts[1],
        )
        return loss, {"sft/loss": stats["sft/loss"]}


class _PairObjective(Objective):
    """Losses that are a mean over the pairs of the minibatch: share = mean_micro × pairs_micro / pairs."""

    example_kind = "pair"
    rows_per_example = 2

    def local_counts(self, minibatch: RolloutBatch) -> Tensor:
        _require_pairs(minibatch)
        return torch.tensor([len(minibatch) / 2], dtype=torch.float32)

    def micro_loss(self, model, micro, aux, counts, state):
        _require_pairs(micro)
        loss, stats = self.pair_loss(model, micro, aux)
        weight = (len(micro) / 2) / counts[0].clamp(min=1)
        return loss * weight, _share(stats, weight)

    def pair_loss(self, model, micro: RolloutBatch, aux: Optional[Tensor]) -> tuple[Tensor, Stats]:
        raise NotImplementedError


@OBJECTIVES.register("dpo")
class DPOObjective(_PairObjective):
    """DPO family against a frozen reference: offline.preference_loss picks sigmoid / ipo / hinge.

    Summed response log-probabilities (rlhf.algorithms.preference_losses.dpo_loss); stats
    dpo/{loss, chosen_reward, rejected_reward, reward_accuracy, margin}.

    `nll_weight` (offline.nll_weight unless given) > 0 adds the chosen responses' per-token NLL
    (mean over pairs), RPO / iterative RPO (Pang et al. 2024, arXiv:2404.19733 eq. 1; TRL's
    DPOConfig.rpo_alpha, 1.0 recommended):
    without it DPO may lower the chosen responses' likelihood along with the rejected ones'.
    Stat dpo/chosen_nll; dpo/loss is then the sum.
    """

    needs_reference = True
    headline = "margin"

    prefix = "dpo"

    def __init__(self, cfg: OfflineConfig, *, nll_weight: Optional[float] = None, temperature: float = 1.0):
        super().__init__(cfg, temperature=temperature)
        self.nll_weight = cfg.nll_weight if nll_weight is None else nll_weight

    def pair_loss(self, model, micro, aux):
        mask = loss_mask(micro)
        logprobs = token_logprobs(model, micro, self.temperature)
        summed = torch.where(mask, logprobs, torch.zeros((), device=mask.device)).sum(-1)
        policy_chosen, policy_rejected = _pairs(summed)
        ref_chosen, ref_rejected = _pairs(_require_aux("dpo", aux).to(policy_chosen))
        loss, stats = dpo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            beta=self.cfg.beta,
            loss_type=self.cfg.preference_loss,
            label_smoothing=self.cfg.label_smoothing,
        )
        if self.nll_weight:
            chosen_nll = -(policy_chosen / mask[0::2].sum(-1).clamp(min=1)).mean()
            loss = loss + self.nll_weight * chosen_nll
            stats = {**stats, "dpo/loss": loss.detach(), "dpo/chosen_nll": chosen_nll.detach()}
        return loss, stats


@OBJECTIVES.register("simpo")
class SimPOObjective(_PairObjective):
    """SimPO: reference-free, length-averaged log-probabilities with a target margin (no reference)."""

    headline = "margin"

    prefix = "simpo"

    def pair_loss(self, model, micro, aux):
        chosen, rejected = _pairs(sequence_logprobs(model, micro, average=True, temperature=self.temperature))
        return simpo_loss(chosen, rejected, beta=self.cfg.beta, gamma_beta_ratio=self.cfg.simpo_gamma_beta_ratio)


@OBJECTIVES.register("orpo")
class ORPOObjective(_PairObjective):
    """ORPO: chosen NLL (per-sequence token mean) + orpo_lambda × odds-ratio loss, no reference."""

    headline = "log_odds_ratio"

    prefix = "orpo"

    def pair_loss(self, model, micro, aux):
        chosen, rejected = _pairs(sequence_logprobs(model, micro, average=True, temperature=self.temperature))
        return orpo_loss(chosen, rejected, -chosen, beta=self.cfg.orpo_lambda)


@OBJECTIVES.register("reward")
class RewardObjective(_PairObjective):
    """Bradley-Terry reward-model loss on last-token scores (optionally minus the pair's margin)."""

    model_kind = "reward"
    headline = "accuracy"

    prefix = "rm"

    def pair_loss(self, model, micro, aux):
        chosen, rejected = _pairs(last_token_scores(model, micro))
        margin = None
        if self.cfg.rm_use_margin and micro.margins is not None:
            margin = micro.margins[0::2].to(chosen)
        return pairwise_reward_loss(chosen, rejected, margin=margin)


@OBJECTIVES.register("kto")
class KTOObjective(Objective):
    """KTO on the labelled rows, with the KL reference point z0 from the minibatch's mismatched rows.

    z0 = max(sum_ranks sum_KL-rows (policy - ref) / number of KL rows, 0), computed without
    gradient once per minibatch (as TRL gathers its KL estimate over processes); then
    loss = mean over the minibatch's labelled rows of the KTO value loss (rlhf.algorithms.kto_loss).
    """

    example_kind = "kto"
    rows_per_example = 2
    needs_reference = True
    prefix = "kto"

    @staticmethod
    def _labels(batch: RolloutBatch) -> Tensor:
        if batch.labels is None:
            raise DataError("a KTO batch needs `labels` (1 desirable, 0 undesirable, -1 mismatched KL row)")
        return batch.labels

    def local_counts(self, minibatch: RolloutBatch) -> Tensor:
        labels = self._labels(minibatch)
        return torch.stack([(labels >= 0).sum(), (labels == 1).sum(), (labels == 0).sum()]).float()

    def begin_minibatch(self, model, minibatch, aux, all_reduce, micro_rows):
        labels = self._labels(minibatch)
        kl_rows = (labels < 0).nonzero().flatten()
        total = torch.zeros(2, device=labels.device)
        if len(kl_rows):
            ref = _require_aux("kto", aux)[kl_rows]
            with torch.no_grad():
                chunks = minibatch.select(kl_rows).chunks(micro_rows)
                policy = torch.cat([sequence_logprobs(model, c, temperature=self.temperature) for c in chunks])
            total = torch.stack([(policy - ref.to(policy)).sum(), torch.tensor(float(len(kl_rows))).to(policy)])
        total = all_reduce(total)
        return {"z0": (total[0] / total[1].clamp(min=1)).clamp(min=0)}

    def micro_loss(self, model, micro, aux, counts, state):
        labels = self._labels(micro)
        rows = (labels >= 0).nonzero().flatten()
        labelled = micro.select(rows)
        policy = sequence_logprobs(model, labelled, temperature=self.temperature)
        ref = _require_aux("kto", aux)[rows].to(policy)
        desirable = labels[rows] == 1
        z0 = state["z0"].to(policy)
        loss, stats = kto_loss(
            policy,
            ref,
            desirable,
            z0,
            beta=self.cfg.beta,
            desirable_weight=self.cfg.kto_desirable_weight,
            undesirable_weight=self.cfg.kto_undesirable_weight,
        )
        weight = len(rows) / counts[0].clamp(min=1)
        rewards = self.cfg.beta * (policy - ref).detach()
        # per-class means of the minibatch: sum over this micro's rows / the global class count
        shares = {
            "kto/loss": stats["kto/loss"] * weight,
            "kto/kl": z0 * weight,
            "kto/chosen_reward": torch.where(desirable, rewards, 0).sum() / counts[1].clamp(min=1),
            "kto/rejected_reward": torch.where(~desirable, rewards, 0).sum() / counts[2].clamp(min=1),
        }
        return loss * weight, shares
