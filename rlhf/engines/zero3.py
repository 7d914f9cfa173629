"""ZeRO-3 settings shared by the trained roles (TrainEngine) and the frozen ones, and the frozen roles' engine.

Frozen roles (reference, reward model) under ZeRO-3 inference: each rank holds 1/N of every
parameter. DeepSpeed's ZeRO-3 hooks, started without an optimizer, gather each module's parameters
just before it runs and release them after, so the group can host a model that no one rank could,
at the price of an all-gather per module and forward pass. Every gather is a collective over the
group: all ranks must run the same number of forward passes (rlhf.workers.frozen pads the shorter
shards with repeated micro-batches).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rlhf.models.zero3 import full_numel
from rlhf.utils.distributed import import_deepspeed

GATHER_WINDOW_FRACTION = 64
"""At most about 1/GATHER_WINDOW_FRACTION of a model's elements stay gathered on a rank (`zero3_gather_limits`)."""
DEEPSPEED_MAX_LIVE = 10**9
"""DeepSpeed's default stage3_max_live_parameters and stage3_max_reuse_distance (elements)."""
DEEPSPEED_PREFETCH = 5 * 10**7
"""DeepSpeed's default stage3_prefetch_bucket_size (elements)."""
DEEPSPEED_REDUCE_BUCKET = 5 * 10**8
"""DeepSpeed's default reduce_bucket_size (elements)."""


def zero3_gather_limits(module: nn.Module) -> dict[str, int]:
    """ZeRO-3 buffer sizes for `module`: about 1/64 of its elements gathered (or reduced) at once beyond
    a rank's partition.

    DeepSpeed's defaults (max live parameters and max reuse distance 1e9 elements, prefetch 5e7,
    gradient reduce bucket 5e8) suit models of tens of billions of parameters. A smaller model stays
    gathered under them: a parameter whose next use lies within 1e9 elements is kept, and for a
    300M model that is every parameter between two forward passes, and between forward and backward
    (measured: each of 2 ranks held the whole model from the second forward pass on, and the first
    backward's reduce bucket added 2 GiB). So the window is capped at a 64th of the model, never
    below its largest parameter (which must be whole to run) nor above DeepSpeed's defaults; half of
    it is prefetched, and gradients are reduced in buckets of the window's size.

    The optimizer steps its partition in sub-groups of the window's size too. DeepSpeed's default
    sub-group (1e9 elements) holds a smaller model's whole partition, and each step copies the
    partition's gradients into one flat tensor and runs AdamW over it, whose temporaries
    (exp_avg_sq.sqrt() / c + eps) are each as large as that tensor (measured on 2 ranks, 97M
    parameters: 1.8 GiB above baseline per rank during an update, 1.3 GiB with window sub-groups).
    A 64th rather than a 16th took 120 MiB off each of 2 ranks' update peak of a 294M model (and 73 MiB
    off a 2-rank reference group's logprob pass) at the same step time (benchmarks/memory.py).
    """
    sizes = [full_numel(p) for p in module.parameters()]
    window = min(max(max(sizes, default=1), sum(sizes) // GATHER_WINDOW_FRACTION), DEEPSPEED_MAX_LIVE)
    return {
        "stage3_max_live_parameters": window,
        "stage3_max_reuse_distance": window,
        "stage3_prefetch_bucket_size": min(window // 2, DEEPSPEED_PREFETCH),
        "reduce_bucket_size": min(window, DEEPSPEED_REDUCE_BUCKET),
        "sub_group_size": window,
    }


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
    installs the per-module gather hooks, with `zero3_gather_limits`; run forward passes through
    `engine.module` (collective). Needs torch.distributed started on the group's ranks; keep the
    engine alive while the model is used.
    """
    deepspeed = import_deepspeed()

    zero = {**ds_config["zero_optimization"], **zero3_gather_limits(model)}
    engine, *_ = deepspeed.initialize(
        model=model, config={**ds_config, "zero_optimization": zero}, dist_init_required=False
    )
    return engine


def share_fp32_master_weights(zero_optimizer: Any) -> int:
    """Make a ZeRO-3 optimizer's fp32 master partition the weight partition itself when the weights are
    float32 already, as DeepSpeed means to; returns the bytes freed.

    DeepSpeed's stage 3 skips the master copy when the partition's dtype and device match its own
    (stage3.py, `_create_fp32_partitions`), but compares the partition's torch.device with its device
    name, a string ('cpu', 'cuda:0'), which never compares equal: a float32 run kept two copies of every
    rank's partition (measured: 560 MiB of 2 ranks' 294M-parameter model, benchmarks/memory.py). The
    master tensors keep their identity (the torch optimizer holds them) and take the partition's
    storage; DeepSpeed's copy of the master into the partition after each step becomes a copy onto
    itself. Mixed precision (bf16/fp16 weights, fp32 master) and optimizer offload keep their copy.
    """
    masters = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    partitions = getattr(zero_optimizer, "fp16_partitioned_groups_flat", None)
    if not masters or not partitions or getattr(zero_optimizer, "offload_optimizer", False):
        return 0
    freed = 0
    for master, partition in zip(masters, partitions):
        same_kind = master.dtype == partition.dtype and master.device == partition.device
        if not same_kind or master.untyped_storage().data_ptr() == partition.untyped_storage().data_ptr():
            continue
        if zero_optimizer.optimizer.state.get(master):  # optimizer state is keyed by the master tensor
            continue
        freed += master.untyped_storage().nbytes()
        master.data = partition.data
    return freed
