"""DeepSpeed training engine for one role (policy or critic): config, step, full-weight gather, save/load.

Batch arithmetic (rlhf/config/schema.py): train_batch_size sequences per optimizer step across all ranks,
micro_batch_size per forward/backward on one rank, so each rank sees train_batch_size / dp rows per
optimizer step in (train_batch_size / dp) / micro_batch_size micro-batches (DeepSpeed's gradient
accumulation steps). With a token budget (max_tokens_per_micro_batch) a step has as many packed
micro-batches as its rows need; the caller marks the last one (`backward(..., ends_step=True)`)
and runs the same number on every rank.

Loss scaling: a worker computes each micro-batch loss as its *share* of the global minibatch loss
(aggregated with global token/sequence counts, rlhf.algorithms.aggregation), so the shares of all
micro-batches on all ranks sum to the minibatch loss. DeepSpeed divides by the accumulation steps
(disabled here) and averages gradients over ranks (undone by multiplying by dp), so the gradient
is that of the full minibatch loss whatever the data-parallel layout.

Non-finite guard: an optimizer step whose loss (any micro-batch share on any rank) or global
gradient norm is not finite is skipped on every rank together (one all-reduced flag): no
parameter, optimizer-state or LR-schedule update, gradients cleared. DeepSpeed's ZeRO and bf16
optimizers already skip on a non-finite gradient norm (reported as `was_step_applied() == False`);
plain fp32 without ZeRO does not, so there the engine checks the gradients itself, and a
non-finite *loss* with finite gradients is caught by the engine in every configuration, which then
gates the optimizer (`_SkipGate`: torch AdamW, or DeepSpeed's CPU Adam with offload_optimizer).
`NonFiniteCounter` counts the skips; the controllers stop after run.max_consecutive_nonfinite in
a row (rlhf.trainers.nonfinite).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rlhf.config import OptimConfig, TrainConfig
from rlhf.engines.zero3 import share_fp32_master_weights, zero3_gather_limits
from rlhf.errors import CheckpointError, ConfigError
from rlhf.models.peft_utils import is_peft_layer, merged_layer_tensors, plain_module, plain_tensor
from rlhf.utils.distributed import import_deepspeed
from rlhf.utils.seeding import get_rng_state, set_rng_state

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "state"
"""DeepSpeed checkpoint tag: one state per directory (the controller makes one directory per step)."""

SCHEDULERS = ("constant", "cosine")
MAX_SHARD_BYTES = 5 << 30
"""safetensors shard size of save_hf (the Hugging Face default)."""


# -- config arithmetic -----------------------------------------------------------------------


def gradient_accumulation_steps(train_cfg: TrainConfig, dp: int) -> int:
    """train_batch_size / (micro_batch_size × dp); ConfigError with the arithmetic when not whole."""
    per_step = train_cfg.micro_batch_size * dp
    if train_cfg.micro_batch_size < 1 or train_cfg.train_batch_size < 1:
        raise ConfigError(
            f"train_batch_size ({train_cfg.train_batch_size}) and micro_batch_size "
            f"({train_cfg.micro_batch_size}) must be >= 1"
        )
    if train_cfg.train_batch_size % per_step:
        raise ConfigError(
            f"train_batch_size {train_cfg.train_batch_size} is not divisible by micro_batch_size "
            f"{train_cfg.micro_batch_size} × dp {dp} = {per_step}; pick a train_batch_size that is a "
            f"multiple of {per_step}"
        )
    return train_cfg.train_batch_size // per_step


def deepspeed_config(train_cfg: TrainConfig, *, dp: int, bf16: bool, device: str) -> dict[str, Any]:
    """The DeepSpeed JSON config for `train_cfg` on `dp` ranks."""
    if train_cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {train_cfg.zero_stage}")
    if train_cfg.offload_params and train_cfg.zero_stage != 3:
        raise ConfigError(f"offload_params needs zero_stage 3 (got {train_cfg.zero_stage})")
    if train_cfg.offload_optimizer and train_cfg.zero_stage == 0:
        raise ConfigError("offload_optimizer needs zero_stage >= 1")
    pin = device == "cuda"
    zero: dict[str, Any] = {"stage": train_cfg.zero_stage}
    if train_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if train_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if train_cfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = train_cfg.zero3_param_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": train_cfg.train_batch_size,
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(train_cfg, dp),
        "gradient_clipping": train_cfg.optim.grad_clip,
        "zero_optimization": zero,
        # skip a step whose gradient norm is inf/NaN (the default of deepspeed 0.19; stated, we rely on it)
        "bf16": {"enabled": bf16, "check_grad_overflow": True} if bf16 else {"enabled": False},
        # DeepSpeed lists the optimizers it tests by exact type; the gated subclasses below are not on it
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class _SkipGate:
    """Optimizer mixin: `step` does nothing while `skip` is set. How TrainEngine skips an update that
    DeepSpeed itself would apply (DeepSpeed still runs its step bookkeeping and clears the gradients).

    DeepSpeed calls the optimizer's `step` once per parameter group (ZeRO-1/2) or sub-group (ZeRO-3)
    on its fp32 partitions, with offload too: a gated call leaves those partitions, and so the
    parameters DeepSpeed copies back from them, bit for bit unchanged.
    """

    skip = False

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        if self.skip:
            return None
        return super().step(closure)  # type: ignore[misc]


class GatedAdamW(_SkipGate, torch.optim.AdamW):
    """torch AdamW behind the skip gate: the optimizer when its states stay on the device."""


@functools.cache
def gated_cpu_adam() -> type[torch.optim.Optimizer]:
    """DeepSpeedCPUAdam behind the skip gate: the optimizer of `offload_optimizer` (states in host memory).

    A class made on first use: importing deepspeed must wait until DS_ACCELERATOR is set. Its C++ op
    JIT-builds into TORCH_EXTENSIONS_DIR (rlhf.utils.distributed.torch_extensions_dir) on first use,
    ~40 s, then loads in under a second.
    """
    DeepSpeedCPUAdam = import_deepspeed("ops.adam").DeepSpeedCPUAdam

    class GatedCPUAdam(_SkipGate, DeepSpeedCPUAdam):
        """DeepSpeed's vectorised CPU AdamW (`adamw_mode=True`: decoupled weight decay, as torch's AdamW)."""

    return GatedCPUAdam


class GatedLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that does not advance while its optimizer's gate skips, so a skipped step costs no LR step."""

    def step(self, epoch: Optional[int] = None) -> None:  # type: ignore[override]
        if getattr(self.optimizer, "skip", False):
            return
        super().step(epoch)


def build_optimizer(module: nn.Module, optim_cfg: OptimConfig, *, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms (ndim < 2).

    `cpu_offload` (ZeRO's offload_optimizer): DeepSpeed's CPU Adam, which steps the fp32 partitions
    in host memory 5-7x faster than torch's loop; the same update as torch AdamW (bias-corrected
    moments, eps added to the bias-corrected sqrt(v), decay lr·wd·p decoupled from the gradient).
    """
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    # no empty group: ZeRO drops it, and the scheduler would then count one group too many (BitFit: biases only)
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    betas = tuple(optim_cfg.betas)
    if cpu_offload:
        return gated_cpu_adam()(groups, lr=optim_cfg.lr, betas=betas, eps=optim_cfg.eps, adamw_mode=True)
    return GatedAdamW(groups, lr=optim_cfg.lr, betas=betas, eps=optim_cfg.eps)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, num_training_steps: Optional[int]
) -> GatedLambdaLR:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to 0 at `num_training_steps`."""
    if optim_cfg.scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown optim.scheduler {optim_cfg.scheduler!r}; known: {', '.join(SCHEDULERS)}")
    if optim_cfg.scheduler == "cosine" and not num_training_steps:
        raise ConfigError("optim.scheduler 'cosine' needs the total number of optimizer steps (num_training_steps)")
    warmup = optim_cfg.warmup_steps
    cosine = optim_cfg.scheduler == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not cosine:
            return 1.0
        assert num_training_steps is not None
        progress = min((step - warmup) / max(num_training_steps - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return GatedLambdaLR(optimizer, factor)


# -- the engine ------------------------------------------------------------------------------


class TrainEngine:
    """A DeepSpeed engine around `module` (a causal LM, a PEFT model or a value model).

    Call `init_distributed` first. Every method that touches parameters is collective under
    ZeRO-3: all ranks must call it.
    """

    def __init__(
        self,
        module: nn.Module,
        train_cfg: TrainConfig,
        *,
        dp: int,
        rank: int,
        bf16: bool,
        device: str,
        num_training_steps: Optional[int] = None,
    ):
        deepspeed = import_deepspeed()

        self.train_cfg = train_cfg
        self.dp = dp
        self.rank = rank
        self.has_frozen_params = any(not p.requires_grad for p in module.parameters())
        ds_config = deepspeed_config(train_cfg, dp=dp, bf16=bf16, device=device)
        if train_cfg.zero_stage == 3:
            ds_config["zero_optimization"].update(zero3_gather_limits(module))
        optimizer = build_optimizer(module, train_cfg.optim, cpu_offload=train_cfg.offload_optimizer)
        scheduler = build_lr_scheduler(optimizer, train_cfg.optim, num_training_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        if train_cfg.zero_stage == 3:
            freed = share_fp32_master_weights(self.engine.optimizer)
            if freed:
                logger.info(
                    "ZeRO-3: the fp32 master weights share the partition's memory (%.0f MiB freed)", freed / 2**20
                )
        self.module: nn.Module = self.engine.module
        self.device = self.engine.device
        self.micro_batch_size = train_cfg.micro_batch_size
        self.minibatch_rows = train_cfg.train_batch_size // dp
        """Rows of one optimizer step on this rank."""
        self._gate = optimizer
        # DeepSpeed's ZeRO and bf16 optimizers report (and skip) a non-finite gradient norm; the plain
        # torch optimizer it uses for fp32 without ZeRO has no such check, so the engine checks there
        self._checks_own_grads = not hasattr(self.engine.optimizer, "overflow")
        self._loss_nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._own_grad_norm: Optional[float] = None
        self._micro_steps = 0  # micro-batches of the current optimizer step so far
        self.nonfinite = NonFiniteCounter()
        self._export_units: Optional[list[_Unit]] = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def backward(self, loss_share: Tensor, *, ends_step: Optional[bool] = None) -> None:
        """Backward of one micro-batch's share of the global minibatch loss (see the module docstring).

        `ends_step`: whether this micro-batch is the last of its optimizer step (the gradient
        accumulation boundary: gradients are reduced and the next `step` updates). None counts
        gradient_accumulation_steps micro-batches per step, as DeepSpeed would; token-budget
        micro-batches vary in number from step to step, so their loops say it. The engine always
        sets DeepSpeed's boundary itself, so the two kinds of loop can share one engine.
        """
        if ends_step is None:
            ends_step = self._micro_steps + 1 >= self.engine.gradient_accumulation_steps()
        self._micro_steps = 0 if ends_step else self._micro_steps + 1
        self.engine.set_gradient_accumulation_boundary(ends_step)
        self._loss_nonfinite |= ~torch.isfinite(loss_share.detach()).all()  # no host sync here
        self.engine.backward(loss_share * self.dp, scale_wrt_gas=False)

    def step(self) -> None:
        """Called after every micro-batch; DeepSpeed steps the optimizer at the accumulation boundary.

        At the boundary the step is skipped on every rank when any rank saw a non-finite loss share
        or the global gradient norm is not finite (see the module docstring); `nonfinite` counts it.
        Collective at the boundary: one all-reduce of two flags.
        """
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return
        flags = torch.stack([self._loss_nonfinite, self._grads_nonfinite()]).float()
        if self.dp > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_bad, grads_bad = (bool(f) for f in flags.tolist())
        self._gate.skip = loss_bad or grads_bad
        step = self.global_steps
        try:
            self.engine.step()  # DeepSpeed's bookkeeping; AdamW and the LR schedule do nothing while skipping
        finally:
            self._gate.skip = False
            self._loss_nonfinite = torch.zeros_like(self._loss_nonfinite)
        grads_bad = grads_bad or not self.engine.was_step_applied()  # ZeRO / bf16 skipped it on its own
        self.nonfinite.record(step=step, loss=loss_bad, grad_norm=grads_bad)

    def _grads_nonfinite(self) -> Tensor:
        """Whether this rank's gradients have a non-finite norm, where DeepSpeed does not check (else False).

        Without ZeRO the boundary backward has already all-reduced full gradients on every rank.
        """
        self._own_grad_norm = None
        if not self._checks_own_grads:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
        self._own_grad_norm = float(norm)
        return ~torch.isfinite(norm)

    def grad_norm(self) -> float:
        """Global gradient norm (before clipping) of the last optimizer step (inf when it was not finite)."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # DeepSpeed keeps none for plain fp32 without ZeRO: the engine's own
            norm = self._own_grad_norm
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    # -- full weights -------------------------------------------------------------------------

    def iter_full_parameters(self, bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, Tensor]]:
        """Plain-HF (name, full tensor) pairs on rank 0, each valid until the next; see `iter_full_parameters` below."""
        return _iter_full_parameters(self._units(), self.rank, bucket_bytes)

    def iter_full_parameter_groups(self, bucket_bytes: int = 256 << 20) -> Iterator[list[tuple[str, Tensor]]]:
        """The same pairs a gathered bucket at a time (each list valid until the next; see below)."""
        return _iter_full_parameter_groups(self._units(), self.rank, bucket_bytes)

    def _units(self) -> list[_Unit]:
        """The module's export units, walked once: a weight sync runs every step, and the walk over every
        submodule took a fifth of a 30M-parameter model's sync (benchmarks/weight_sync.py)."""
        if self._export_units is None:
            self._export_units = _export_units(self.module)
        return self._export_units

    def save_hf(
        self,
        directory: str | Path,
        *,
        config: Any,
        tokenizer: Any = None,
        generation_config: Any = None,
        rename: Optional[Callable[[str], str]] = None,
        bucket_bytes: int = 256 << 20,
    ) -> Path:
        """Write a plain Hugging Face checkpoint (safetensors, LoRA merged) from rank 0, atomically.

        Collective: every rank gathers; rank 0 writes each gathered tensor straight into
        `<directory>.tmp-<pid>` and renames it to `directory` when complete (an existing `directory`
        is replaced).
        """
        named = self.iter_full_parameters(bucket_bytes)
        if rename is not None:
            named = ((rename(n), t) for n, t in named)
        if self.rank != 0:
            for _ in named:  # take part in the ZeRO-3 gathers
                pass
            return Path(directory)
        try:
            return write_hf_checkpoint(
                directory, named, config=config, tokenizer=tokenizer, generation_config=generation_config
            )
        except BaseException:
            for _ in named:  # finish the gathers so the other ranks are not left blocked in one
                pass
            raise

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path, client_state: Optional[dict[str, Any]] = None) -> None:
        """DeepSpeed state (module, optimizer, scheduler) plus this rank's RNG state, into `directory`.

        Collective. Frozen parameters (a LoRA base) are left out; `load_checkpoint` expects the same
        base model to be loaded first. The caller makes the step directory atomic (write to a
        temporary name, rename when every role has saved).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            client_state=dict(client_state or {}),
            exclude_frozen_parameters=self.has_frozen_params,
        )
        torch.save(get_rng_state(), directory / f"rng_state_rank{self.rank}.pt")

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote (same dp size); returns its client_state."""
        directory = Path(directory)
        if not (directory / CHECKPOINT_TAG).is_dir():
            raise CheckpointError(f"{directory} holds no DeepSpeed checkpoint (no '{CHECKPOINT_TAG}' folder)")
        load_path, client_state = self.engine.load_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not self.has_frozen_params,
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {directory}")
        rng_file = directory / f"rng_state_rank{self.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            logger.warning("%s has no RNG state for rank %d; random streams restart", directory, self.rank)
        return dict(client_state or {})


@dataclass
class NonFiniteCounter:
    """Optimizer steps skipped for a non-finite loss or gradient norm: in a row, in total, and the last one."""

    consecutive: int = 0
    total: int = 0
    last_step: int = -1
    """DeepSpeed global step (0-based) of the last skipped optimizer step; -1 before any."""
    last_was_loss: bool = False
    """Whether the last skip was for a non-finite loss (else for the gradient norm alone)."""

    def record(self, *, step: int, loss: bool, grad_norm: bool) -> None:
        if not (loss or grad_norm):
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        self.last_step = step
        self.last_was_loss = loss
        logger.warning(
            "optimizer step %d skipped: non-finite %s (%d in a row, %d in total)",
            step,
            "loss" if loss else "gradient norm",
            self.consecutive,
            self.total,
        )

    def metrics(self, prefix: str, skipped: int) -> dict[str, float]:
        """`<prefix>/nonfinite_*` of one update call that skipped `skipped` optimizer steps."""
        return {
            f"{prefix}/nonfinite_skipped": float(skipped),
            f"{prefix}/nonfinite_consecutive": float(self.consecutive),
            f"{prefix}/nonfinite_total": float(self.total),
            f"{prefix}/nonfinite_loss": float(self.last_was_loss) if self.total else 0.0,
        }


def init_distributed(backend: str, timeout_s: float) -> None:
    """Join the default process group from the env:// variables (gloo on CPU, NCCL on GPU)."""
    deepspeed = import_deepspeed()
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s))


# -- gathering full parameters ---------------------------------------------------------------


@dataclass
class _Unit:
    """Parameters exported together: one parameter, one buffer, or a whole peft adapter layer (merged)."""

    name: str
    tensors: list[Tensor] = field(default_factory=list)
    peft_layer: Optional[nn.Module] = None
    single_rank: bool = False
    """One ZeRO-3 parameter partitioned over a group of one rank: its partition is the whole tensor."""

    def full_bytes(self) -> int:
        return sum(getattr(t, "ds_numel", t.numel()) * t.element_size() for t in self.tensors)


def _export_units(module: nn.Module) -> list[_Unit]:
    """Walk the module in registration order; adapter layers (LoRA, IA3, LoHa, LoKr) become one unit
    named like the base layer."""
    units: list[_Unit] = []
    seen: set[int] = set()

    def visit(prefix: str, mod: nn.Module) -> None:
        mod = plain_module(mod)  # a nested PeftModel (the critic's backbone), a modules_to_save head
        if is_peft_layer(mod):
            units.append(_Unit(prefix.rstrip("."), list(mod.parameters()), peft_layer=mod))
            return
        for name, param in mod.named_parameters(recurse=False):
            if id(param) not in seen:  # tied weights are exported once, as HF saves them
                seen.add(id(param))
                units.append(_Unit(prefix + name, [param], single_rank=_single_rank_partition(param)))
        for name, buf in mod.named_buffers(recurse=False):
            if name not in mod._non_persistent_buffers_set:
                units.append(_Unit(prefix + name, [buf]))
        for name, child in mod.named_children():
            visit(f"{prefix}{name}.", child)

    visit("", module)
    return units


def _bucketed(units: list[_Unit], bucket_bytes: int) -> Iterator[list[_Unit]]:
    bucket: list[_Unit] = []
    size = 0
    for unit in units:
        if bucket and size + unit.full_bytes() > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(unit)
        size += unit.full_bytes()
    if bucket:
        yield bucket


def iter_full_parameters(
    module: nn.Module, *, rank: int, bucket_bytes: int = 256 << 20
) -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor) of every parameter and persistent buffer, named as in the plain HF model.

    ZeRO-3 aware: parameters are gathered a bucket (about `bucket_bytes` of full tensors) at a time
    with `deepspeed.zero.GatheredParameters`, so rank 0 holds at most one bucket beyond its shard.
    Adapter layers are merged (LoRA: W + scale · B·A, as peft's merge_and_unload; IA3, LoHa, LoKr
    likewise, rlhf.models.peft_utils) and PEFT's name prefixes
    (`base_model.model.`, `.base_layer`) disappear: `model.layers.0.self_attn.q_proj.weight`.

    No copy is made for the consumer: each tensor is a view of the gathered buffer (ZeRO-3), of the
    partition (ZeRO-3 over one rank: the partition is the whole tensor) or of the live parameter,
    yielded while its bucket is gathered (only a merged adapter layer is computed).
    Contract:
      - consume each tensor before asking for the next one: copy it into the transport or the file,
        or `clone()` what you keep (the bucket is released when the iterator moves past it);
      - never modify a yielded tensor;
      - collective under ZeRO-3: every rank must exhaust the iterator (only rank 0 yields), also
        after rank 0's consumer failed, or the other ranks block in the next gather.
    """
    return _iter_full_parameters(_export_units(module), rank, bucket_bytes)


def iter_full_parameter_groups(
    module: nn.Module, *, rank: int, bucket_bytes: int = 256 << 20
) -> Iterator[list[tuple[str, Tensor]]]:
    """`iter_full_parameters` a gathered bucket at a time: each list is valid until the next is asked
    for, so a consumer may copy its tensors together (in parallel, `weight_sync.ParallelCopy`). The
    merged adapter layers of a bucket are computed together. Same contract otherwise."""
    return _iter_full_parameter_groups(_export_units(module), rank, bucket_bytes)


def _iter_full_parameters(units: list[_Unit], rank: int, bucket_bytes: int) -> Iterator[tuple[str, Tensor]]:
    for bucket in _gathered_buckets(units, rank=rank, bucket_bytes=bucket_bytes):
        for unit in bucket:
            with torch.no_grad():
                exported = _export(unit)
            # yield outside no_grad (the consumer runs between yields) but inside the gather
            yield from exported


def _iter_full_parameter_groups(units: list[_Unit], rank: int, bucket_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    for bucket in _gathered_buckets(units, rank=rank, bucket_bytes=bucket_bytes):
        with torch.no_grad():
            exported = [pair for unit in bucket for pair in _export(unit)]
        yield exported


def _gathered_buckets(units: list[_Unit], *, rank: int, bucket_bytes: int) -> Iterator[list[_Unit]]:
    """The export units a bucket at a time, their ZeRO-3 parameters gathered while the caller holds the
    bucket; only rank 0 gets the buckets, every rank runs every gather."""
    GatheredParameters = import_deepspeed().zero.GatheredParameters

    for bucket in _bucketed(units, bucket_bytes):
        params = [t for unit in bucket if not _reads_partition(unit) for t in unit.tensors]
        with GatheredParameters([t for t in params if isinstance(t, nn.Parameter)], modifier_rank=None):
            if rank == 0:
                yield bucket


def _single_rank_partition(param: Tensor) -> bool:
    group = getattr(param, "ds_process_group", None)
    return hasattr(param, "ds_tensor") and torch.distributed.get_world_size(group=group) == 1


def _reads_partition(unit: _Unit) -> bool:
    """Whether `unit` is exported from its ZeRO-3 partition in place instead of through DeepSpeed's gather:
    one parameter partitioned over a single rank, resident (not swapped out). Its partition is the whole
    tensor, and the gather's per-parameter bookkeeping (fetch, then release, also of the parameters
    DeepSpeed keeps gathered between steps) was most of the export's time besides the consumer's copy
    (with the walk over the modules, 4.3 of a 30M-parameter model's ~20 ms sync on 2 cores)."""
    if not unit.single_rank:
        return False
    param = unit.tensors[0]
    return param.ds_tensor.numel() >= param.ds_numel


def _export(unit: _Unit) -> list[tuple[str, Tensor]]:
    if unit.peft_layer is not None:
        return [(f"{unit.name}.{suffix}", t) for suffix, t in merged_layer_tensors(unit.peft_layer)]
    tensor = unit.tensors[0]
    if hasattr(tensor, "quant_state"):  # a 4-bit QLoRA base: dequantised (computed, like a merged layer)
        return [(unit.name, plain_tensor(tensor))]
    if _reads_partition(unit):
        return [(unit.name, tensor.ds_tensor.detach()[: tensor.ds_numel].view(tensor.ds_shape))]
    return [(unit.name, tensor.detach())]


# -- writing a Hugging Face checkpoint -------------------------------------------------------


def write_hf_checkpoint(
    directory: str | Path,
    named_tensors: Iterable[tuple[str, Tensor]],
    *,
    config: Any,
    tokenizer: Any = None,
    generation_config: Any = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Stream tensors into safetensors shards of a temp dir, add config/tokenizer, rename into place.

    Each tensor is written to its shard file as it arrives and not kept (the iter_full_parameters
    contract: the file reads straight from the gathered buffer), so the writer holds no shard in memory.
    """
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weight_map: dict[str, int] = {}
    total = 0
    files: list[str] = []
    shard: Optional[_SafetensorsShard] = None
    try:
        for name, tensor in named_tensors:
            size = tensor.numel() * tensor.element_size()
            if shard is not None and not shard.fits(name, tensor, max_shard_bytes):
                shard.close()
                shard = None
            if shard is None:
                files.append(f"part-{len(files):05d}.safetensors")
                shard = _SafetensorsShard(tmp / files[-1], header_bytes=_header_reserve(max_shard_bytes))
            shard.add(name, tensor)
            weight_map[name] = len(files) - 1
            total += size
        if shard is None:  # no tensors: one empty shard, as save_file writes it
            files.append(f"part-{len(files):05d}.safetensors")
            shard = _SafetensorsShard(tmp / files[-1], header_bytes=_header_reserve(max_shard_bytes))
        shard.close()
    finally:
        if shard is not None:
            shard.abort()
    if len(files) == 1:
        os.replace(tmp / files[0], tmp / "model.safetensors")
    else:
        final = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        for old, new in zip(files, final):
            os.replace(tmp / old, tmp / new)
        index = {"metadata": {"total_size": total}, "weight_map": {n: final[i] for n, i in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _replace_directory(tmp, directory)
    logger.info("saved %d tensors (%.1f MiB) to %s", len(weight_map), total / 2**20, directory)
    return directory


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
"""torch dtype -> safetensors dtype code (the format's spec, huggingface/safetensors README)."""
_MAX_OFFSET = 10**19
"""More digits than any byte offset can have: a header entry's length with it bounds the real one."""


def _header_reserve(max_shard_bytes: int) -> int:
    """Bytes kept for a shard's JSON header before its data: 1/1024 of a shard, 4 KiB to 1 MiB
    (a 5 GiB shard's header of ~250 bytes per tensor then fits 4000 tensors)."""
    return min(max(max_shard_bytes // 1024, 4 << 10), 1 << 20) // 8 * 8


class _SafetensorsShard:
    """One safetensors file written as tensors arrive: their bytes go straight to the file after a
    reserved header region; `close` writes the header there, padded with spaces (the format allows
    trailing whitespace in the header; safetensors itself pads it to 8 bytes).

    Format: u64 little-endian N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, ...,
    "__metadata__": {...}}, then the data, offsets relative to its start, back to back, no holes.
    """

    _METADATA = {"__metadata__": {"format": "pt"}}

    def __init__(self, path: Path, header_bytes: int):
        self.path = path
        self.header_bytes = header_bytes
        self.entries: dict[str, dict[str, Any]] = {}
        self.data_bytes = 0
        self._header_bound = len(_json(self._METADATA))
        self._file: Any = None

    def fits(self, name: str, tensor: Tensor, max_shard_bytes: int) -> bool:
        """Whether `tensor` joins this shard (a shard never refuses its first tensor)."""
        if not self.entries:
            return True
        size = tensor.numel() * tensor.element_size()
        return (
            self.data_bytes + size <= max_shard_bytes
            and self._header_bound + self._entry_bound(name, tensor) <= self.header_bytes
        )

    def add(self, name: str, tensor: Tensor) -> None:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            known = ", ".join(str(d) for d in SAFETENSORS_DTYPES)
            raise CheckpointError(f"cannot write {name} ({tensor.dtype}) to safetensors; it stores {known}")
        if name in self.entries:
            raise CheckpointError(f"tensor {name} is exported twice")
        bound = self._entry_bound(name, tensor)
        if self._file is None:
            # the first tensor always fits: its header entry widens the reservation if it must
            self.header_bytes = max(self.header_bytes, -(-(self._header_bound + bound) // 8) * 8)
            self._file = open(self.path, "wb")  # closed in close() or abort()
            self._file.seek(8 + self.header_bytes)
        self._header_bound += bound
        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        size = data.numel() * data.element_size()
        if size:
            # one write from the tensor's memory (a copy only where it is not contiguous)
            self._file.write(data.contiguous().reshape(-1).view(torch.uint8).numpy())
        self.entries[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.data_bytes, self.data_bytes + size],
        }
        self.data_bytes += size

    def close(self) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")
            self.header_bytes = 0  # no data to keep a place for
        header = _json({**self._METADATA, **self.entries}).encode()
        assert len(header) <= self.header_bytes or not self.entries, "the header outgrew its bound"
        header += b" " * (max(self.header_bytes, -(-len(header) // 8) * 8) - len(header))
        self._file.seek(0)
        self._file.write(len(header).to_bytes(8, "little"))
        self._file.write(header)
        self._file.close()
        self._file = None

    def abort(self) -> None:
        """Close the file after a failure (the temp directory holding it is left for the next write)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def _entry_bound(name: str, tensor: Tensor) -> int:
        code = SAFETENSORS_DTYPES.get(tensor.dtype, "F8_E4M3")
        entry = {name: {"dtype": code, "shape": list(tensor.shape), "data_offsets": [_MAX_OFFSET, _MAX_OFFSET]}}
        return len(_json(entry).encode()) - 1  # minus one brace, plus one comma


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _replace_directory(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first and removed after."""
    old = None
    if dst.exists():
        old = dst.with_name(f"{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
