"""ZeRO-3 inference: a frozen model (reference, reward model) partitioned over a group of ranks.

Each rank holds 1/N of every parameter. DeepSpeed's ZeRO-3 hooks, started without an optimizer,
gather each module's parameters just before it runs and release them after, so the group can host
a model that no one rank could, at the price of an all-gather per module and forward pass. Every
gather is a collective over the group: all ranks must run the same number of forward passes
(rlhf.workers.frozen pads the shorter shards with repeated micro-batches).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def inference_deepspeed_config(*, micro_batch_size: int, bf16: bool, persistence_threshold: int) -> dict[str, Any]:
    """The DeepSpeed config of a ZeRO-3 inference group: no optimizer, parameters partitioned over every rank."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,  # DeepSpeed requires batch sizes even with no training
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence_threshold},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def start_inference_engine(model: nn.Module, ds_config: dict[str, Any]) -> Any:
    """The DeepSpeed engine that partitions `model` (built under zero.Init for `ds_config`, or whole) and
    installs the per-module gather hooks; run forward passes through `engine.module` (collective).

    Needs torch.distributed started on the group's ranks; keep the engine alive while the model is used.
    """
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
    return engine
