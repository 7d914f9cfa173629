"""The actor policy: DeepSpeed ZeRO training of a causal LM (optionally LoRA), logprobs, weight sync.

Loss of one micro-batch (each term aggregated with the minibatch's global counts, see trainable.py):

    loss = POLICY_LOSSES[algorithm.policy_loss](logprobs, old_logprobs, advantages, mask, ...)
         + kl_coef · kl_loss(logprobs, ref_logprobs)        when use_kl_loss and kl_coef > 0
         - entropy_coef · aggregate(entropy)                 when entropy_coef > 0

with importance weights between the old policy and the rollout engine's (truncated or masked at
algorithm.rollout_is_cap, rlhf.algorithms.compute_rollout_is_weights) on the policy term when the resolved
algorithm.rollout_is is on (rlhf.config.rollout_is_mode) and the batch carries the engine's logprobs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from rlhf.algorithms import (
    POLICY_LOSSES,
    aggregate,
    compute_rollout_is_weights,
    entropy_from_logits,
    kl_loss,
    logprobs_from_logits,
    masked_mean,
    rollout_mismatch_terms,
)
from rlhf.config import ClusterConfig, ModelConfig, TrainConfig
from rlhf.data.batch import RolloutBatch
from rlhf.data.token_budget import MicroBatch, rows_of
from rlhf.engines.adapters import ADAPTER_DIR, has_adapter, save_adapter
from rlhf.engines.weight_sync import WeightSyncGroup
from rlhf.errors import DataError, WeightSyncError
from rlhf.models.loading import load_tokenizer, resolve_model_path
from rlhf.models.logprobs import response_logprobs, response_token_logits, to_rows
from rlhf.models.peft_utils import load_base_model
from rlhf.workers.group import dispatch
from rlhf.workers.trainable import (
    RLTrainableWorker,
    StepStats,
    TrainableWorker,
    forward_in_row_order,
    require_fields,
)

logger = logging.getLogger(__name__)


class CausalLMWorker(TrainableWorker):
    """One data-parallel rank of a trained causal LM: loading (with model.peft), logprobs, HF export and
    weight sync. PolicyWorker adds the RL update, OfflinePolicyWorker the offline objectives."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, cluster_cfg: ClusterConfig, seed: int = 0):
        super().__init__(model_cfg, train_cfg, cluster_cfg, seed)
        self.tokenizer: Any = None
        self.hf_config: Any = None
        self.generation_config: Any = None
        self._weight_sync: Optional[WeightSyncGroup] = None

    def _load_model(self, model_path: str) -> Any:
        """The HF causal LM at `model_path` (its tokenizer too, when the directory has one)."""
        path = resolve_model_path(model_path)
        self.tokenizer = _load_tokenizer(path, self.model_cfg.trust_remote_code)
        model = load_base_model(
            path, self.model_cfg, dtype=self.dtype, tokenizer=self.tokenizer, zero3_config=self._zero3_config()
        )
        model.config.use_cache = False
        self.hf_config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        return model

    @dispatch("split_dp", collect="concat")
    def compute_logprobs(self, batch: RolloutBatch, temperature: float = 1.0) -> Tensor:
        """Logprobs [B, R] of the response tokens under the current weights (eval mode, no grad).

        `temperature`: the softmax's; for sampled responses the sampling one
        (rlhf.engines.rollout.logprob_temperature), so they are the sampling policy's logprobs.
        """
        engine = self._require_engine()
        engine.eval()
        return forward_in_row_order(
            self._micro_batches(batch),
            lambda micro: response_logprobs(engine, micro, temperature=temperature)[0],
            empty=torch.zeros(0, batch.response_ids.shape[1]),
        )

    # -- export and weight sync ---------------------------------------------------------------

    @dispatch("broadcast", collect="first")
    def save_hf(self, directory: str) -> str:
        """Plain HF checkpoint (safetensors, adapters merged, config, tokenizer) written by rank 0 (all ranks gather).

        With a peft adapter the directory also gets `adapter/` (peft's format, `save_adapter`); for
        prompt/prefix tuning the weights are the unchanged base model and the adapter is the result.
        """
        engine = self._require_engine()
        engine.save_hf(
            directory, config=self.hf_config, tokenizer=self.tokenizer, generation_config=self.generation_config
        )
        if has_adapter(engine.module):
            self.save_adapter(str(Path(directory) / ADAPTER_DIR))
        return str(Path(directory))

    @dispatch("broadcast", collect="first")
    def save_adapter(self, directory: str) -> str:
        """The peft adapter alone (adapter_config.json + adapter_model.safetensors), gathered under ZeRO-3.

        Written by rank 0; returns the directory, or "" when the policy has no peft adapter.
        """
        saved = save_adapter(self._require_engine().module, directory, rank=self.rank)
        return "" if saved is None else str(saved)

    @dispatch("rank0", collect="first")
    def init_weight_sync(
        self, host: str, port: int, world_size: int, backend: str = "gloo", transport: str = "collective"
    ) -> str:
        """Join the weight-sync group as its rank 0 (engines are ranks 1..world_size-1); returns the transport.

        Blocks until every engine joins: start the engines' join with `run` before waiting on this.
        `transport` (collective, shm, auto) is decided here; a shared-memory segment is sized for the
        full model, so a too-small /dev/shm makes "auto" fall back at join rather than fail a sync.
        """
        if self._weight_sync is not None:
            self._weight_sync.close()
        module = self._require_engine().module
        full_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters())
        full_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
        self._weight_sync = WeightSyncGroup.create(
            host,
            port,
            0,
            world_size,
            backend=backend,
            timeout_s=self.cluster_cfg.collective_timeout_s,
            transport=transport,
            shm_bytes=full_bytes,
            copy_threads=self.cluster_cfg.weight_sync_copy_threads,
        )
        return self._weight_sync.transport

    @dispatch("rank0", collect="first")
    def close_weight_sync(self) -> None:
        """Leave the weight-sync group (after the engines closed their side)."""
        if self._weight_sync is not None:
            self._weight_sync.close()
            self._weight_sync = None

    def release(self) -> bool:
        self.close_weight_sync()  # local: its peers may be gone already
        return True

    @dispatch("broadcast", collect="first")
    def sync_weights(self, bucket_mb: int = 64) -> dict[str, Any]:
        """Stream the full weights to the engines; every rank takes part in the ZeRO-3 gathers.

        Rank 0 feeds the gathered (LoRA-merged, plain-named) tensors, a gathered bucket at a time,
        straight into the sync group's buckets (on shm, copied on cluster.weight_sync_copy_threads
        threads); the engines must be in `receive` at the same time. Returns rank 0's transfer stats
        (`weight_sync/...`) and "checksums", of every tensor sent (rlhf.engines.checksum).
        """
        engine = self._require_engine()
        bucket_bytes = bucket_mb << 20
        named = engine.iter_full_parameter_groups(bucket_bytes)
        if self.rank != 0:
            for _ in named:
                pass
            return {}
        try:
            if self._weight_sync is None:
                raise WeightSyncError("sync_weights before init_weight_sync: join the weight-sync group first")
            sent = self._weight_sync.send(named, bucket_bytes=bucket_bytes, grouped=True)
        except BaseException:
            # finish the gathers so the other ranks are not left blocked in a collective
            for _ in named:
                pass
            raise
        return {
            "weight_sync/seconds": sent.seconds,
            "weight_sync/mib": sent.num_bytes / 2**20,
            "weight_sync/tensors": float(sent.num_tensors),
            "weight_sync/buckets": float(sent.num_buckets),
            "weight_sync/shm": float(self._weight_sync.transport == "shm"),
            "checksums": sent.checksums,  # not a metric: rlhf.trainers.roles.sync_weights compares and drops it
        }


class PolicyWorker(RLTrainableWorker, CausalLMWorker):
    """One data-parallel rank of the policy: the causal LM with the RL update (arguments: RLTrainableWorker's)."""

    def __init__(self, *args: Any, rollout_is: str = "off", **kwargs: Any):
        """`rollout_is`: algorithm.rollout_is resolved (truncate, mask or off; rlhf.config.rollout_is_mode)."""
        super().__init__(*args, **kwargs)
        POLICY_LOSSES.check(self.algo_cfg.policy_loss, "algorithm.policy_loss")
        self.policy_loss = POLICY_LOSSES.get(self.algo_cfg.policy_loss)
        self.rollout_is = rollout_is

    @dispatch("broadcast", collect="first")
    def set_rollout_is(self, mode: str) -> str:
        """Switch the rollout importance weights (algorithm.mismatch_action=correct turns them on mid-run)."""
        self.rollout_is = mode
        return mode

    @dispatch("split_dp", collect="mean")
    def update(self, batch: RolloutBatch, temperature: float = 1.0) -> dict[str, float]:
        """ppo_epochs × minibatches of PPO-style updates on this rank's shard; global stats `policy/...`.

        Needs batch.advantages (and ref_logprobs with the KL loss), computed at the same `temperature`, at which
        the new logprobs and the entropy are computed too, and batch.old_logprobs, unless the batch gets exactly
        one optimizer step (one epoch, one minibatch): then the old policy is the one this forward runs, and its
        logprobs are taken from it, detached (the controller's `logprobs_in_update`), with the engine-vs-trainer
        `rollout/...` stats (rlhf.algorithms.rollout_mismatch) computed here, since only this pass sees both.
        """
        engine = self._require_engine()
        needed = ["advantages"]
        if self._use_kl_loss:
            needed.append("ref_logprobs")
        require_fields(self.role, batch, *needed)
        if batch.old_logprobs is None and (self.algo_cfg.ppo_epochs != 1 or len(batch) != engine.minibatch_rows):
            raise DataError(
                f"{self.role}: a batch without old_logprobs takes them from the update's forward, which is the old "
                f"policy only for one optimizer step per batch; this one gets {self.algo_cfg.ppo_epochs} epoch(s) "
                f"of {len(batch) // engine.minibatch_rows} minibatch(es): compute old_logprobs first"
            )
        engine.train()
        skipped_before = engine.nonfinite.total
        stats = StepStats()
        for minibatch in self._minibatches(batch, self.algo_cfg.ppo_epochs):
            tokens, seqs = self._global_counts(minibatch.effective_loss_mask)
            micros = self._micro_batches(minibatch)
            for i, (_, micro) in enumerate(micros):
                loss = self._micro_batch_loss(micro, tokens, seqs, temperature, stats)
                engine.backward(loss, ends_step=i == len(micros) - 1)
                engine.step()
            stats.minibatches += 1
            self._optimizer_step_stats(stats, "policy")
        return self._update_metrics(stats, "policy", skipped_before)

    def _micro_batch_loss(
        self, micro: MicroBatch, tokens: Tensor, seqs: Tensor, temperature: float, stats: StepStats
    ) -> Tensor:
        algo = self.algo_cfg
        counts = {"global_tokens": tokens, "global_seqs": seqs, "constant_normalizer": self.constant_normalizer}
        rows = rows_of(micro)  # old logprobs, advantages, ... in the [b, R] layout
        mask = rows.effective_loss_mask  # multi-turn trajectories: the environment's tokens carry no loss
        logits, labels = response_token_logits(self._require_engine(), micro, temperature=temperature)
        logprobs = to_rows(micro, logprobs_from_logits(logits, labels))
        old_logprobs = rows.old_logprobs
        if old_logprobs is None:  # one optimizer step per batch: this forward is the old policy's (see `update`)
            old_logprobs = logprobs.detach()
            if rows.rollout_logprobs is not None:
                self._mismatch_stats(rows.rollout_logprobs, old_logprobs, mask, tokens, stats)
        is_weights = None
        if self.rollout_is != "off" and rows.rollout_logprobs is not None:
            is_weights, bounded = compute_rollout_is_weights(
                old_logprobs, rows.rollout_logprobs, mask, cap=algo.rollout_is_cap, mode=self.rollout_is
            )
            stats.add_share("policy/is_weight_mean", is_weights.sum() / tokens.clamp(min=1))
            stats.add_share("policy/is_bounded_frac", bounded.sum() / tokens.clamp(min=1))
        loss, loss_stats = self.policy_loss(
            logprobs,
            old_logprobs,
            rows.advantages,
            mask,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            dual_clip=algo.dual_clip,
            agg=algo.loss_agg,
            rollout_is_weights=is_weights,
            **counts,
        )
        stats.add_share("policy/loss", loss_stats.pop("policy/loss"))
        for key, value in loss_stats.items():
            stats.add_mean(key, value)
        if self._use_kl_loss:
            kl, _ = kl_loss(logprobs, rows.ref_logprobs, mask, kind=algo.kl_estimator, agg=algo.loss_agg, **counts)
            loss = loss + algo.kl_coef * kl
            stats.add_share("policy/kl", kl)
        # entropy joins the graph only when it is part of the loss (it costs a [B, R, V] softmax)
        with torch.set_grad_enabled(algo.entropy_coef > 0 and torch.is_grad_enabled()):
            entropy = aggregate(to_rows(micro, entropy_from_logits(logits)), mask, algo.loss_agg, **counts)
        if algo.entropy_coef > 0:
            loss = loss - algo.entropy_coef * entropy
        stats.add_share("policy/entropy", entropy)
        stats.add_share("policy/total_loss", loss)
        return loss

    @staticmethod
    def _mismatch_stats(engine: Tensor, trainer: Tensor, mask: Tensor, tokens: Tensor, stats: StepStats) -> None:
        """This micro-batch's share of rollout_mismatch's stats over the whole (single) minibatch."""
        diff, kl = rollout_mismatch_terms(engine, trainer, mask)
        stats.add_share("rollout/logprob_diff", diff.sum() / tokens.clamp(min=1))
        stats.add_share("rollout/mismatch_kl", kl.sum() / tokens.clamp(min=1))
        stats.add_max("rollout/mismatch_kl_max", masked_mean(kl, mask, dim=-1).max())  # every rank: one collective

    @property
    def _use_kl_loss(self) -> bool:
        return self.algo_cfg.use_kl_loss and self.algo_cfg.kl_coef > 0


def _load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    """The checkpoint's tokenizer (save_hf writes it again), or None for a weights-only directory."""
    if Path(path).is_dir() and not (Path(path) / "tokenizer_config.json").exists():
        return None
    return load_tokenizer(path, trust_remote_code=trust_remote_code)
