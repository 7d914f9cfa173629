"""What the DeepSpeed-trained roles (policy, critic) share: distributed setup, minibatch loop, stats, checkpoints.

The update loop of both roles, for one rank's shard of the rollout batch:

    for epoch in range(ppo_epochs):
        for minibatch in shard.chunks(train_batch_size / dp):            # one optimizer step each
            tokens, seqs = all_reduce(real tokens, sequences of the minibatch)
            for micro in micro_batches(minibatch):                        # gradient accumulation
                loss_share = loss(micro, global_tokens=tokens, global_seqs=seqs)
                engine.backward(loss_share, ends_step=micro is the last); engine.step()

Because every loss is aggregated with the minibatch's *global* counts, the micro-batch losses on
all ranks sum to the loss of the whole minibatch, and the result does not depend on dp or on the
micro-batch size (rlhf.algorithms.aggregation, rlhf.engines.train_engine).

Micro-batches (`micro_batches`) are micro_batch_size padded rows, or, with the role's
max_tokens_per_micro_batch, packed rows of at most that many real tokens (rlhf.data.token_budget):
their number per step varies, so the loop marks the accumulation boundary itself, and every rank
runs as many as the rank that needs the most (the ranks with fewer split their fullest bins; no
empty micro-batches), because ZeRO-3 forwards and ZeRO-2/3 backwards are collective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from rlhf.algorithms import count_seqs, count_tokens
from rlhf.config import AlgorithmConfig, ClusterConfig, ModelConfig, TrainConfig
from rlhf.data.batch import RolloutBatch
from rlhf.data.token_budget import (
    MicroBatch,
    pack_rows,
    restore_row_order,
    sequence_lengths,
    spread_bins,
    token_budget_bins,
)
from rlhf.engines.train_engine import TrainEngine, deepspeed_config, gradient_accumulation_steps
from rlhf.errors import CheckpointError, ConfigError, DataError
from rlhf.models.peft_utils import apply_peft
from rlhf.models.zero3 import parameter_counts
from rlhf.utils.distributed import MMAP_THRESHOLD_BYTES, set_mmap_threshold, torch_backend
from rlhf.utils.seeding import seed_everything
from rlhf.workers.group import Worker, dispatch

logger = logging.getLogger(__name__)

TRAIN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TrainableWorker(Worker):
    """A Worker that owns a TrainEngine; subclasses say how their module is loaded (`_load_model`) and
    where model.peft applies (`_apply_peft`), `init_model` does the rest."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, cluster_cfg: ClusterConfig, seed: int = 0):
        super().__init__()
        if model_cfg.dtype not in TRAIN_DTYPES:
            raise ConfigError(f"model.dtype must be one of {', '.join(TRAIN_DTYPES)}, got {model_cfg.dtype!r}")
        gradient_accumulation_steps(train_cfg, self.world_size)  # ConfigError with the arithmetic
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.cluster_cfg = cluster_cfg
        self.seed = seed
        self.dtype = TRAIN_DTYPES[model_cfg.dtype]
        self.engine: Optional[TrainEngine] = None

    # -- setup --------------------------------------------------------------------------------

    @dispatch("broadcast", collect="first")
    def init_model(self, model_path: str, num_training_steps: Optional[int] = None) -> dict[str, int]:
        """Load the role's model from `model_path` (partitioned as it loads under ZeRO-3), enable
        model.gradient_checkpointing, apply model.peft, start DeepSpeed (optimizer and LR schedule).

        `num_training_steps` (optimizer steps of the whole run) is needed by the cosine schedule.
        Returns {"num_parameters", "num_trainable_parameters", "dropout_layers"} (the count of `dropout_layers`).
        """
        self._setup_distributed()
        model = self._load_model(model_path)
        if self.model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = self._apply_peft(model)
        counts = parameter_counts(model)
        counts["dropout_layers"] = len(dropout_layers(model))
        self._build_engine(model, num_training_steps)
        return counts

    def _load_model(self, model_path: str) -> Any:
        """The role's module from `model_path`, built for `_zero3_config()`; called on every rank."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to load its model")

    def _apply_peft(self, model: Any) -> torch.nn.Module:
        """model.peft (LoRA, IA3, prompt tuning, BitFit, ...) on the loaded module; the causal-LM form here."""
        return apply_peft(model, self.model_cfg)

    def _setup_distributed(self) -> None:
        self.setup_distributed(torch_backend(self.cluster_cfg.device), self.cluster_cfg.collective_timeout_s)
        # Identical initial weights on every rank (fresh heads, LoRA A matrices) ...
        seed_everything(self.seed)

    def _zero3_config(self) -> Optional[dict[str, Any]]:
        """The engine's DeepSpeed config when it partitions parameters (zero_stage 3), else None.

        Models are built for it inside deepspeed.zero.Init (rlhf.models.zero3), so no rank holds the
        whole model. Call after `_setup_distributed`.
        """
        if self.train_cfg.zero_stage != 3:
            return None
        if self.cluster_cfg.device == "cpu":
            set_mmap_threshold(MMAP_THRESHOLD_BYTES)  # gathered buffers go back to the system when freed
        return deepspeed_config(
            self.train_cfg, dp=self.world_size, bf16=self.dtype == torch.bfloat16, device=self.cluster_cfg.device
        )

    def _build_engine(self, module: torch.nn.Module, num_training_steps: Optional[int]) -> None:
        self.engine = TrainEngine(
            module,
            self.train_cfg,
            dp=self.world_size,
            rank=self.rank,
            bf16=self.dtype == torch.bfloat16,
            device=self.cluster_cfg.device,
            num_training_steps=num_training_steps,
        )
        # ... and independent random streams (dropout) per rank from here on.
        seed_everything(self.seed + self.rank)

    def _require_engine(self) -> TrainEngine:
        if self.engine is None:
            raise RuntimeError(f"{self.role} rank {self.rank}: call init_model before using the model")
        return self.engine

    # -- the update loop ----------------------------------------------------------------------

    def _minibatches(self, batch: RolloutBatch, epochs: int) -> Iterator[RolloutBatch]:
        """`epochs` passes over the shard in minibatches of train_batch_size / dp rows."""
        rows = self._require_engine().minibatch_rows
        if len(batch) == 0 or len(batch) % rows:
            raise ConfigError(
                f"{self.role}: a rank's shard of {len(batch)} rows is not a multiple of train_batch_size "
                f"{self.train_cfg.train_batch_size} / dp {self.world_size} = {rows} rows per optimizer step; "
                f"make rollout_batch_size × n_samples_per_prompt a multiple of train_batch_size"
            )
        for _ in range(epochs):
            yield from batch.chunks(rows)

    def _micro_batches(self, batch: RolloutBatch) -> list[tuple[list[int], MicroBatch]]:
        """This rank's micro-batches of `batch` on the engine's device (see `micro_batches`)."""
        cfg = self.train_cfg
        return micro_batches(
            batch,
            cfg.micro_batch_size,
            cfg.max_tokens_per_micro_batch,
            self._require_engine().device,
            field=f"{self.role}.max_tokens_per_micro_batch",
        )

    def _optimizer_step_stats(self, stats: StepStats, prefix: str) -> None:
        """After a minibatch's optimizer step: its gradient norm and learning rate (`<prefix>/grad_norm`, `/lr`)."""
        engine = self._require_engine()
        stats.add_mean(f"{prefix}/grad_norm", engine.grad_norm())
        stats.add_mean(f"{prefix}/lr", engine.lr())

    def _update_metrics(self, stats: StepStats, prefix: str, skipped_before: int) -> dict[str, float]:
        """The update's global stats plus `<prefix>/nonfinite_*`: the optimizer steps skipped since the
        engine's skip total was `skipped_before` (every rank skips together, so they agree)."""
        engine = self._require_engine()
        values = stats.reduce(self.world_size, engine.device)
        values.update(engine.nonfinite.metrics(prefix, engine.nonfinite.total - skipped_before))
        return values

    def _global_counts(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(real tokens, sequences) of the global minibatch: one all-reduce of two numbers."""
        counts = torch.stack([count_tokens(mask), count_seqs(mask)]).to(self._require_engine().device)
        if self.world_size > 1:
            dist.all_reduce(counts)
        return counts[0], counts[1]

    # -- checkpoints --------------------------------------------------------------------------

    @dispatch("broadcast", collect="first")
    def save_checkpoint(self, directory: str) -> str:
        """DeepSpeed model/optimizer/scheduler state and RNG states into `directory` (all ranks)."""
        self._require_engine().save_checkpoint(directory)
        return str(directory)

    @dispatch("broadcast", collect="first")
    def load_checkpoint(self, directory: str) -> str:
        """Restore `save_checkpoint`'s state; init_model with the same base model first (all ranks)."""
        if not Path(directory).is_dir():
            raise CheckpointError(f"{self.role}: checkpoint directory {directory} does not exist")
        self._require_engine().load_checkpoint(directory)
        return str(directory)


class RLTrainableWorker(TrainableWorker):
    """A trained role of the RL loop (policy, critic, distillation student): the algorithm's loss settings."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        algo_cfg: AlgorithmConfig,
        cluster_cfg: ClusterConfig,
        seed: int = 0,
        *,
        constant_normalizer: Optional[float] = None,
    ):
        """`constant_normalizer`: C of the seq_mean_token_sum_norm aggregation (Dr.GRPO: max_new_tokens)."""
        super().__init__(model_cfg, train_cfg, cluster_cfg, seed)
        self.algo_cfg = algo_cfg
        self.constant_normalizer = constant_normalizer


class StepStats:
    """Per-update statistics kept as tensors, reduced across ranks with one all-reduce at the end.

    `add_share`: a micro-batch's share of a minibatch quantity (summed over micro-batches and
    ranks, then averaged over minibatches): losses aggregated with global counts.
    `add_mean`: averaged over every call and every rank (fractions, norms, learning rates).
    `add_max`: the largest over every call and every rank.
    """

    def __init__(self) -> None:
        self.shares: dict[str, Tensor] = {}
        self.means: dict[str, Tensor] = {}
        self.mean_counts: dict[str, int] = {}
        self.maxes: dict[str, Tensor] = {}
        self.minibatches = 0

    def add_share(self, key: str, value: Tensor) -> None:
        self.shares[key] = self.shares.get(key, 0.0) + value.detach().float()

    def add_mean(self, key: str, value: Tensor | float) -> None:
        value = torch.as_tensor(value, dtype=torch.float32).detach()
        self.means[key] = self.means.get(key, 0.0) + value
        self.mean_counts[key] = self.mean_counts.get(key, 0) + 1

    def add_max(self, key: str, value: Tensor) -> None:
        value = value.detach().float()
        self.maxes[key] = torch.maximum(self.maxes[key], value) if key in self.maxes else value

    def reduce(self, world_size: int, device: torch.device) -> dict[str, float]:
        """Global values on every rank: one all-reduce (and one more, MAX, with maxima), one host sync."""
        keys = sorted(self.shares) + sorted(self.means)
        local = [self.shares[k] / max(self.minibatches, 1) for k in sorted(self.shares)]
        local += [self.means[k] / self.mean_counts[k] / world_size for k in sorted(self.means)]
        reduced = []
        if keys:
            packed = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(device) for v in local])
            if world_size > 1:
                dist.all_reduce(packed)
            reduced.append(packed)
        if self.maxes:
            keys += sorted(self.maxes)
            maxes = torch.stack([self.maxes[k].to(device) for k in sorted(self.maxes)])
            if world_size > 1:
                dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
            reduced.append(maxes)
        return dict(zip(keys, torch.cat(reduced).tolist())) if reduced else {}


def dropout_layers(model: torch.nn.Module) -> list[str]:
    """What makes a train-mode forward random: dropout modules with p > 0 (LoRA's included) and the model config's
    dropout rates > 0 that attention kernels apply without a module (attention_dropout, attn_pdrop, ...)."""
    found = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    config = getattr(model, "config", None)
    for key, value in vars(config).items() if config is not None else ():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, (int, float)) and value > 0:
            found.append(f"config.{key}")
    return found


def device_chunks(batch: RolloutBatch, size: int, device: torch.device) -> Iterator[RolloutBatch]:
    """Micro-batches of `size` rows on `device`; slicing stays on the CPU, where the batch arrived."""
    for micro in batch.chunks(size):
        yield micro.to(device)


def micro_batches(
    batch: RolloutBatch,
    size: int,
    max_tokens: Optional[int],
    device: torch.device,
    *,
    field: str,
    even_out: bool = True,
) -> list[tuple[list[int], MicroBatch]]:
    """(rows of `batch`, micro-batch on `device`) pairs that cover every row once.

    Without a token budget (`max_tokens` None or 0): `size` consecutive padded rows each. With
    one: packed micro-batches of at most `max_tokens` real tokens each, grouped first-fit
    decreasing (rlhf.data.token_budget; DataError naming `field` for a longer row). In a
    process group of several ranks their number is all-reduced (MAX) and a rank with fewer
    splits its fullest bins (`spread_bins`), so every rank runs the same number of forwards
    (`even_out=False`: the caller evens them out itself).
    """
    if not max_tokens:
        chunks = zip(range(0, len(batch), size), batch.chunks(size))
        return [(list(range(start, start + len(micro))), micro.to(device)) for start, micro in chunks]
    lengths = sequence_lengths(batch)
    bins = token_budget_bins(lengths, max_tokens, field=field)
    if even_out and dist.is_initialized() and dist.get_world_size() > 1:
        count = torch.tensor([len(bins)], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        bins = spread_bins(bins, lengths, int(count))
    return [(rows, pack_rows(batch.select(rows)).to(device)) for rows in bins]


def forward_in_row_order(
    micros: list[tuple[list[int], MicroBatch]], forward: Callable[[MicroBatch], Tensor], empty: Tensor
) -> Tensor:
    """`forward(micro)` of every micro-batch without gradients, float32 on the CPU, rows in the batch's
    order (packed micro-batches group rows out of order); `empty` when there are none."""
    parts = []
    with torch.no_grad():
        for _, micro in micros:
            parts.append(forward(micro).float().cpu())
    return restore_row_order(parts, [rows for rows, _ in micros]) if parts else empty


def require_fields(role: str, batch: RolloutBatch, *names: str) -> None:
    """DataError naming the batch fields a phase needs but that are still None."""
    missing = [n for n in names if getattr(batch, n) is None]
    if missing:
        raise DataError(f"{role}: the batch has no {', '.join(missing)}; run the phase that fills them first")
