"""Rollout engines as Ray actors: `RolloutWorker` hosts one backend, `RolloutGroup` drives N of them.

    rollout = RolloutGroup(model_path, cfg.model, cfg.rollout, cfg.cluster, seed=cfg.run.seed)
    outputs = rollout.generate(prompt_token_ids, cfg.rollout.sampling, n=8, seed=step_seed)

Weight sync (rank 0 is the trainer's rank 0, engine k is rank k + 1 of `1 + rollout.num_ranks`):

    host, port = <trainer rank 0's node_ip(), free_port()>
    sender = policy.run(PolicyWorker.init_weight_sync, host, port, 1 + rollout.num_ranks, backend, timeout)
    rollout.init_weight_sync(host, port, backend, timeout)      # blocks until every rank joined
    policy.wait(sender)
    ...
    sender = policy.run(PolicyWorker.sync_weights)                # after each update
    receivers = rollout.receive_weights_async()
    policy.wait(sender); rollout.wait(receivers)

With rollout.enable_sleep the engines give their accelerator memory back between rollouts:
`rollout.memory` (SleepBetweenRollouts) is called around every generate and sync by the callers that
train in between (rlhf.trainers.roles.RolloutSupervisor, the LLM judge); otherwise it does nothing.

A dead engine is replaced by `restart_dead_engines` (same bundle, same constructor arguments); it
starts from the checkpoint on disk, so the caller re-forms the weight-sync group and pushes the
current weights (rlhf.trainers.roles.RolloutSupervisor does both and retries the failed call).

Prompts are spread over the engines in contiguous, near-equal slices (order preserved); the
engine holding the slice that starts at prompt `offset` samples with seed `seed + offset * n`,
so outputs do not depend on the number of engines (see rlhf.engines.rollout.base).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, Optional

import torch
from ray.util.placement_group import PlacementGroup
from torch import Tensor

from rlhf.config import ClusterConfig, ModelConfig, RolloutConfig, SamplingConfig, engine_resources, role_threads
from rlhf.engines.checksum import Checksums, tensor_checksum
from rlhf.engines.rollout import ROLLOUT_BACKENDS, SLEEP_TAGS, Generation
from rlhf.engines.rollout.hf_backend import HFBackend
from rlhf.engines.weight_sync import WeightSyncGroup
from rlhf.errors import ConfigError, WeightSyncError
from rlhf.utils.ray_session import runtime_env_vars
from rlhf.workers.group import Pending, Worker, WorkerGroup, dispatch

logger = logging.getLogger(__name__)


class RolloutWorker(Worker):
    """One rollout engine (the backend named by `rollout_cfg.backend`) in its own actor process."""

    def __init__(
        self, model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, cluster_cfg: ClusterConfig, seed: int
    ) -> None:
        super().__init__()
        start = time.perf_counter()
        backend_cls = ROLLOUT_BACKENDS.get(rollout_cfg.backend)
        self.backend = backend_cls(model_path, model_cfg, rollout_cfg, cluster_cfg, seed + self.rank)
        self.weight_sync: Optional[WeightSyncGroup] = None
        logger.info(
            "rollout engine %d (%s) ready in %.1fs", self.rank, rollout_cfg.backend, time.perf_counter() - start
        )

    @dispatch("all", collect="concat")
    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, n: int, seed: Optional[int]
    ) -> list[list[Generation]]:
        """Per prompt of this engine's slice, `n` generations."""
        if not prompt_token_ids:
            return []
        return self.backend.generate(prompt_token_ids, sampling, n, seed)

    @dispatch("all", collect="list")
    def init_weight_sync(
        self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        """Join the weight-sync group as `rank` (blocks until rank 0 and every engine joined)."""
        if self.weight_sync is not None:
            self.weight_sync.close()
        self.weight_sync = WeightSyncGroup.create(host, port, rank, world_size, backend, timeout_s)

    def release(self) -> bool:
        """Only an hf engine's process is handed on: vLLM keeps process-wide state (its environment, compiled
        graphs, the CPU KV cache) that dropping the engine does not undo."""
        self.close_weight_sync()  # local: its peers may be gone already
        return isinstance(self.backend, HFBackend)

    @dispatch("broadcast", collect="list")
    def receive_weights(self) -> dict[str, float]:
        """Join rank 0's broadcast, load every tensor in place, reset the prefix cache; with the stats, the
        checksums of what was loaded (read back from the model where the backend can, else of what arrived),
        which the controller compares with what rank 0 sent (rlhf.trainers.roles.check_loaded_weights)."""
        if self.weight_sync is None:
            raise WeightSyncError("receive_weights before init_weight_sync; join the weight-sync group first")
        start = time.perf_counter()
        read_back = self.backend.reads_back_weights
        names: list[str] = []
        arrived: Checksums = []

        def stream() -> Iterator[tuple[str, Tensor]]:
            for name, tensor in self.weight_sync.receive():
                names.append(name)
                if not read_back:  # else read back once loaded: one checksum pass per tensor either way
                    arrived.append((name, tensor_checksum(tensor)))
                yield name, tensor

        # shm: the views stay valid until the next receive, so the hf backend adopts them (no copy)
        self.backend.load_weights(stream(), share=self.weight_sync.transport == "shm")
        self.backend.reset_prefix_cache()
        stats = self.weight_sync.last_stats
        return {
            "num_tensors": stats.num_tensors,
            "num_bytes": stats.num_bytes,
            "transfer_s": stats.seconds,
            "total_s": time.perf_counter() - start,
            "checksums": self.backend.loaded_checksums(names) if read_back else arrived,
            "read_back": read_back,
        }

    @dispatch("broadcast", collect="list")
    def weights_digest(self) -> str:
        """sha256 of the engine's weights (hf backend): equal digests mean bit-identical weights."""
        model = getattr(self.backend, "model", None)
        if model is None:
            raise WeightSyncError(
                f"weights_digest reads the hf backend's model; {type(self.backend).__name__} has none"
            )
        return weights_digest(model)

    @dispatch("broadcast", collect="list")
    def close_weight_sync(self) -> None:
        """Leave the weight-sync group (before the trainer closes its side)."""
        if self.weight_sync is not None:
            self.weight_sync.close()
            self.weight_sync = None

    @dispatch("broadcast", collect="list")
    def sleep(self) -> None:
        """Free accelerator memory until `wake_up` (rollout.enable_sleep; no-op on CPU)."""
        self.backend.sleep()

    @dispatch("broadcast", collect="list")
    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Take back what `sleep` released: `tags` of SLEEP_TAGS, None for all."""
        self.backend.wake_up(tags)


class RolloutGroup:
    """`rollout_cfg.num_engines` RolloutWorkers behind one `generate`."""

    def __init__(
        self,
        model_path: str,
        model_cfg: ModelConfig,
        rollout_cfg: RolloutConfig,
        cluster_cfg: ClusterConfig,
        seed: int = 0,
        *,
        placement_group: Optional[PlacementGroup] = None,
        bundle_indices: Optional[list[int]] = None,
    ) -> None:
        ROLLOUT_BACKENDS.check(rollout_cfg.backend, "rollout.backend")
        self.num_engines = rollout_cfg.num_engines
        self.memory: EngineMemory = SleepBetweenRollouts(self) if rollout_cfg.enable_sleep else EngineMemory()
        """When the engines hold accelerator memory; callers that train between rollouts call it around
        generate and sync (rlhf.trainers.roles.RolloutSupervisor, the LLM judge)."""
        self.group = WorkerGroup(
            RolloutWorker,
            role="rollout",
            num_workers=rollout_cfg.num_engines,
            resources=engine_resources(rollout_cfg, cluster_cfg),
            placement_strategy=cluster_cfg.placement_strategy,
            init_args=(model_path, model_cfg, rollout_cfg, cluster_cfg, seed),
            env_vars=runtime_env_vars(cluster_cfg),
            device=cluster_cfg.device,
            threads_per_worker=role_threads(cluster_cfg.rollout, cluster_cfg),
            placement_group=placement_group,
            bundle_indices=bundle_indices,
            call_timeout_s=cluster_cfg.call_timeout_s,
            # on CPU the engines' processes start while the caller starts its other roles; on CUDA they are up
            # before the caller goes on to load any weights: vLLM sizes its KV cache from the memory free at start
            wait_ready=cluster_cfg.device == "cuda",
        )

    @property
    def num_ranks(self) -> int:
        """Weight-sync ranks the engines take (one per engine); the group's world size is 1 + this."""
        return self.num_engines

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, n: int, seed: Optional[int] = None
    ) -> list[list[Generation]]:
        """Per prompt (in order), `n` generations; prompts are split across the engines."""
        return self.wait(self.generate_async(prompt_token_ids, sampling, n, seed))

    def generate_async(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, n: int, seed: Optional[int] = None
    ) -> Pending:
        """`generate` without waiting; pass the result to `wait`."""
        if n < 1:
            raise ConfigError(f"n (samples per prompt) must be >= 1, got {n}")
        bounds = even_slices(len(prompt_token_ids), self.num_engines)
        slices = [[list(p) for p in prompt_token_ids[a:b]] for a, b in bounds]
        seeds = [None if seed is None else seed + a * n for a, _ in bounds]
        k = self.num_engines
        return self.group.run(RolloutWorker.generate, slices, [sampling] * k, [n] * k, seeds)

    def init_weight_sync(self, host: str, port: int, backend: str, timeout_s: float) -> None:
        """Join every engine to the weight-sync group hosted at host:port (ranks 1..num_ranks).

        Blocks until the group is complete, so start the trainer's side first (`run`, not `call`).
        """
        self.wait(self.init_weight_sync_async(host, port, backend, timeout_s))

    def init_weight_sync_async(self, host: str, port: int, backend: str, timeout_s: float) -> Pending:
        """`init_weight_sync` without waiting."""
        k = self.num_engines
        ranks = list(range(1, k + 1))
        return self.group.run(
            RolloutWorker.init_weight_sync, [host] * k, [port] * k, ranks, [k + 1] * k, [backend] * k, [timeout_s] * k
        )

    def receive_weights_async(self) -> Pending:
        """Every engine joins rank 0's next `send`; wait for it together with the sender."""
        return self.group.run(RolloutWorker.receive_weights)

    def close_weight_sync(self) -> None:
        """Every engine leaves the weight-sync group (before the trainer closes its side)."""
        self.group.call(RolloutWorker.close_weight_sync)

    @property
    def role(self) -> str:
        """The engines' role name, as WorkerError/WorkerDiedError report it."""
        return self.group.role

    def restart_dead_engines(self, timeout_s: Optional[float] = None) -> list[int]:
        """Recreate every engine whose process is gone; returns their ranks (the weight-sync group
        must be re-formed afterwards: the new engines are in none, and hold the checkpoint's weights)."""
        dead = self.group.dead_ranks(timeout=timeout_s)
        for rank in dead:
            self.group.restart(rank)
        return dead

    def wait(self, pending: Pending, timeout: Optional[float] = None) -> Any:
        """Block for a pending call; remote failures raise WorkerError with the engine's traceback."""
        return self.group.wait(pending, timeout=timeout)

    def sleep(self) -> None:
        """Every engine releases its accelerator memory (see `memory` for when)."""
        self.group.call(RolloutWorker.sleep)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Every engine takes back `tags` of SLEEP_TAGS (None: all)."""
        self.group.call(RolloutWorker.wake_up, tags)

    def shutdown(self) -> None:
        """Kill the engines (idempotent)."""
        self.group.shutdown()


class EngineMemory:
    """rollout.enable_sleep=false: the engines keep weights and KV cache in accelerator memory all run long."""

    def before_generate(self) -> None:
        """Everything a generate call needs is resident."""

    def after_generate(self) -> None:
        """The rollout is done; what comes next (scoring, the update) may use the engines' memory."""

    def before_sync(self) -> None:
        """The weights are resident, to be overwritten in place."""


class SleepBetweenRollouts(EngineMemory):
    """rollout.enable_sleep=true (roles sharing a GPU): the engines free their memory while the trainer works.

        generate   wake_up(what sleeps) → generate → sleep (KV cache dropped, weights to host memory)
        sync       wake_up(["weights"]) → load the new weights in place; the KV cache stays released
        generate   wake_up(["kv_cache"]) → generate → sleep ...

    Waking the weights alone for the sync keeps the KV cache (most of vLLM's share of the GPU) free
    until the next generate (vLLM's sleep mode, levels and tags). The state is the group's: an engine
    restarted in between comes up awake, and waking it again is a no-op. On CPU every call is a no-op
    in the backends (there is no accelerator memory to free), so the same order runs everywhere.
    """

    def __init__(self, engines: RolloutGroup) -> None:
        self.engines = engines
        self.asleep: tuple[str, ...] = ()
        """SLEEP_TAGS the engines released and have not taken back yet."""

    def before_generate(self) -> None:
        if self.asleep:
            self.engines.wake_up(list(self.asleep))
            self.asleep = ()

    def after_generate(self) -> None:
        self.engines.sleep()
        self.asleep = SLEEP_TAGS

    def before_sync(self) -> None:
        if "weights" in self.asleep:
            self.engines.wake_up(["weights"])
            self.asleep = tuple(tag for tag in self.asleep if tag != "weights")


def weights_digest(model: Any) -> str:
    """sha256 over (name, dtype, shape, bytes) of every parameter and buffer, in name order."""
    import hashlib

    digest = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def even_slices(length: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, end) ranges covering range(length), sizes differing by at most 1."""
    base, extra = divmod(length, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds
