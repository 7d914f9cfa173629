"""Shared set-up of the actors that host a frozen model (reference, reward model, teacher): no optimizer.

zero_stage 0: each actor holds the whole model and needs no collective (the actors of a group are
independent and can be colocated with other roles). zero_stage 3: the group's actors join one process
group and partition the model over it (rlhf.engines.zero3): it is built inside
deepspeed.zero.Init and streamed in from its checkpoint (rlhf.models.zero3), so no actor ever holds
it whole, and every forward pass gathers it a module at a time. Each actor still computes its own
data-parallel shard of the batch; `_forward_micro_batches` keeps the ranks' forward passes in step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rlhf.config import INFERENCE_ZERO_STAGES, ClusterConfig, ModelConfig, ReferenceConfig, RewardConfig, RLHFConfig
from rlhf.data.batch import RolloutBatch
from rlhf.data.token_budget import MicroBatch, restore_row_order
from rlhf.engines.zero3 import inference_deepspeed_config, start_inference_engine
from rlhf.errors import ConfigError
from rlhf.models.loading import load_causal_lm
from rlhf.models.zero3 import parameter_counts
from rlhf.utils.distributed import ZERO3_INFERENCE_MMAP_THRESHOLD_BYTES, set_mmap_threshold, torch_backend
from rlhf.workers.group import Worker
from rlhf.workers.trainable import micro_batches

T = TypeVar("T")


def frozen_group_options(cfg: RLHFConfig, role: ReferenceConfig | RewardConfig) -> dict[str, Any]:
    """WorkerGroup keyword arguments of a frozen role (reference, reward model): the policy's micro-batch
    size or the role's token budget (with token-balanced shards), and its ZeRO-3 partitioning."""
    return dict(
        model_cfg=cfg.model,
        cluster_cfg=cfg.cluster,
        micro_batch_size=cfg.policy.micro_batch_size,
        max_tokens_per_micro_batch=role.max_tokens_per_micro_batch,
        balance_tokens=bool(role.max_tokens_per_micro_batch),
        zero_stage=role.zero_stage,
        zero3_param_persistence_threshold=role.zero3_param_persistence_threshold,
    )


class FrozenModelWorker(Worker):
    """Holds the model config, the device and the micro-batch size or token budget; subclasses load `self.model`
    (`_hold`)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cluster_cfg: ClusterConfig,
        *,
        micro_batch_size: int = 8,
        max_tokens_per_micro_batch: Optional[int] = None,
        zero_stage: int = 0,
        zero3_param_persistence_threshold: int = 100_000,
    ):
        """`max_tokens_per_micro_batch`: packed micro-batches of that many real tokens (None or 0: padded rows).
        `zero_stage` 3 partitions the model over the group's actors; `zero3_param_persistence_threshold`
        as TrainConfig's (parameters with fewer elements stay whole on every actor)."""
        super().__init__()
        if zero_stage not in INFERENCE_ZERO_STAGES:
            raise ConfigError(
                f"{self.role}: zero_stage {zero_stage} is not one of {INFERENCE_ZERO_STAGES} (a frozen model "
                f"has no optimizer state or gradients to partition: 0 keeps it whole, 3 partitions it)"
            )
        self.model_cfg = model_cfg
        self.cluster_cfg = cluster_cfg
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if cluster_cfg.device == "cuda" else torch.device("cpu")
        )
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.zero_stage = zero_stage
        self.zero3_param_persistence_threshold = zero3_param_persistence_threshold
        self.model: nn.Module | None = None
        self.engine: Any = None
        """The DeepSpeed engine whose hooks gather the partitioned model (zero_stage 3), else None."""

    def _zero3_config(self) -> Optional[dict[str, Any]]:
        """zero_stage 3: join the group's process group (collective) and return the ZeRO-3 inference
        config to build and run the model with; zero_stage 0: None."""
        if self.zero_stage != 3:
            return None
        if self.cluster_cfg.device == "cpu":
            set_mmap_threshold(ZERO3_INFERENCE_MMAP_THRESHOLD_BYTES)
        self.setup_distributed(torch_backend(self.cluster_cfg.device), self.cluster_cfg.collective_timeout_s)
        return inference_deepspeed_config(
            micro_batch_size=self.micro_batch_size,
            bf16=self.model_cfg.dtype == "bfloat16",
            persistence_threshold=self.zero3_param_persistence_threshold,
        )

    def _hold(self, model: nn.Module, zero3_config: Optional[dict[str, Any]]) -> dict[str, int]:
        """Freeze `model` and keep it as `self.model`: on this device, or partitioned by a ZeRO-3 inference
        engine (collective). Returns {"num_parameters"} (counted in full)."""
        model.requires_grad_(False)
        model.eval()
        if zero3_config is None:
            self.model = model.to(self.device)
        else:
            self.engine = start_inference_engine(model, zero3_config)
            self.model = self.engine.module
        return {"num_parameters": parameter_counts(model)["num_parameters"]}

    def _hold_causal_lm(self, model_path: str) -> dict[str, int]:
        """Load the causal LM at `model_path` (model.dtype, partitioned under zero_stage 3) and `_hold` it."""
        zero3_config = self._zero3_config()
        model = load_causal_lm(
            model_path,
            dtype=self.model_cfg.dtype,
            trust_remote_code=self.model_cfg.trust_remote_code,
            use_safetensors=self.model_cfg.use_safetensors,
            zero3_config=zero3_config,
        )
        return self._hold(model, zero3_config)

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"{self.role} rank {self.rank}: call init_model first")
        return self.model

    def _micro_batches(self, batch: RolloutBatch) -> list[tuple[list[int], MicroBatch]]:
        """(rows, micro-batch on this device) pairs of this rank's shard: padded rows, or packed under the
        token budget (rlhf.workers.trainable.micro_batches); `_forward_micro_batches` evens out their number."""
        if not len(batch):
            return []
        field = f"{self.role}.max_tokens_per_micro_batch"
        return micro_batches(
            batch, self.micro_batch_size, self.max_tokens_per_micro_batch, self.device, field=field, even_out=False
        )

    def _forward_micro_batches(
        self, batch: RolloutBatch, forward: Callable[[MicroBatch], T]
    ) -> list[tuple[list[int], T]]:
        """(rows, `forward(micro)`) without gradients for each micro-batch of this rank's shard.

        Under ZeRO-3 each forward pass gathers the parameters collectively, so every rank runs as many
        passes as the rank with the most micro-batches (one all-reduce): a rank with fewer repeats one
        of its micro-batches (or a one-token row, for an empty shard) and drops those results.
        """
        micros = self._micro_batches(batch)
        passes = len(micros)
        if self.engine is not None:
            count = torch.tensor([passes], dtype=torch.long, device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            passes = int(count.item())
        padding = micros[-1][1] if micros else _one_token_batch().to(self.device)
        outputs = []
        with torch.no_grad():
            for index in range(passes):
                micro = micros[index][1] if index < len(micros) else padding
                output = forward(micro)
                if index < len(micros):
                    outputs.append((micros[index][0], output))
        return outputs

    def _forward_in_row_order(
        self, batch: RolloutBatch, forward: Callable[[MicroBatch], Tensor], empty: Tensor
    ) -> Tensor:
        """`forward(micro)` as float32 on the CPU, rows in the batch's order (packed micro-batches group
        rows out of order); `empty` for an empty shard."""
        outputs = self._forward_micro_batches(batch, lambda micro: forward(micro).float().cpu())
        if not outputs:
            return empty
        return restore_row_order([out for _, out in outputs], [rows for rows, _ in outputs])


def _one_token_batch() -> RolloutBatch:
    """A one-row batch (one prompt and one response token, id 0): the forward pass of an empty shard's padding."""
    ones = torch.ones(1, 1, dtype=torch.long)
    return RolloutBatch(prompt_ids=ones * 0, prompt_mask=ones, response_ids=ones * 0, response_mask=ones)
