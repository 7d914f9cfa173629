"""Role plumbing shared by the controllers: start a worker group (a trained one: `start_trained_group`,
`start_policy_group`), wire and run the policy→rollout weight sync, check that every trained rank sees
run.output_dir (`check_shared_output_dir`), record where each rank runs (`write_placement`), keep the
rollout engines alive and hand their memory to the trainer between rollouts (`RolloutSupervisor`), stop
cleanly when a rank dies (`stop_on_dead_rank`)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional, TypeVar

from rlhf.config import (
    ClusterConfig,
    ResourceConfig,
    RLHFConfig,
    SamplingConfig,
    TrainConfig,
    role_threads,
    weight_sync_backend,
    weight_sync_transport,
)
from rlhf.engines.checksum import Checksums, describe, differences
from rlhf.engines.rollout import Generation
from rlhf.errors import ConfigError, RunStoppedError, WeightSyncError, WorkerDiedError
from rlhf.trainers.checkpointing import CheckpointManager, write_json_atomic
from rlhf.utils.distributed import node_id, node_ip
from rlhf.utils.ray_session import runtime_env_vars
from rlhf.workers.group import Worker, WorkerGroup, wait_all
from rlhf.workers.policy import PolicyWorker
from rlhf.workers.rollout import RolloutGroup

logger = logging.getLogger(__name__)

T = TypeVar("T")

GroupStarter = Callable[..., WorkerGroup]
"""`start_group` without its first argument (the cluster config): (worker_cls, role, num_workers, resources,
**kwargs) -> WorkerGroup. A controller passes its own to record every group it starts."""

PLACEMENT_FILE = "placement.json"
"""Written into run.output_dir at start-up: the nodes, and the node of every rank of every role."""


def start_group(
    cluster: ClusterConfig,
    worker_cls: type,
    role: str,
    num_workers: int,
    resources: ResourceConfig,
    *,
    balance_tokens: bool = False,
    minibatch_rows: Optional[int] = None,
    **init_kwargs: Any,
) -> WorkerGroup:
    """`num_workers` actors of `worker_cls` placed and configured by the cluster preset; every wait on
    them is limited by cluster.call_timeout_s. `balance_tokens` / `minibatch_rows`: see WorkerGroup
    (a role with a token budget). Returns before the actors' constructors ran (WorkerGroup's
    wait_ready=False; the first call waits for them), so a controller starts every role before it calls one."""
    return WorkerGroup(
        worker_cls,
        role=role,
        num_workers=num_workers,
        resources=resources,
        placement_strategy=cluster.placement_strategy,
        init_kwargs=init_kwargs,
        env_vars=runtime_env_vars(cluster),
        device=cluster.device,
        threads_per_worker=role_threads(resources, cluster),
        call_timeout_s=cluster.call_timeout_s,
        balance_tokens=balance_tokens,
        minibatch_rows=minibatch_rows,
        wait_ready=False,
    )


def start_trained_group(
    cfg: RLHFConfig,
    worker_cls: type,
    role: str,
    train_cfg: TrainConfig,
    resources: ResourceConfig,
    *,
    start: Optional[GroupStarter] = None,
    **kwargs: Any,
) -> WorkerGroup:
    """train_cfg.num_workers ranks of a TrainableWorker subclass, each built from cfg.model, `train_cfg`,
    cfg.cluster and cfg.run.seed, plus `kwargs`: what `worker_cls` adds (algo_cfg, offline_cfg, ...) and
    start_group's options (token balancing). `start` defaults to start_group on cfg.cluster."""
    start = start or partial(start_group, cfg.cluster)
    return start(
        worker_cls,
        role,
        train_cfg.num_workers,
        resources,
        model_cfg=cfg.model,
        train_cfg=train_cfg,
        cluster_cfg=cfg.cluster,
        seed=cfg.run.seed,
        **kwargs,
    )


def start_policy_group(
    cfg: RLHFConfig,
    worker_cls: type,
    *,
    role: str = "policy",
    start: Optional[GroupStarter] = None,
    **kwargs: Any,
) -> WorkerGroup:
    """The trained policy (or the offline stage's trained model): cfg.policy.num_workers ranks of `worker_cls`
    on cfg.cluster.policy's resources (`start_trained_group`). A PolicyWorker needs algo_cfg=cfg.algorithm;
    call init_model next."""
    return start_trained_group(cfg, worker_cls, role, cfg.policy, cfg.cluster.policy, start=start, **kwargs)


def start_rollout_group(cfg: RLHFConfig, model_path: str, roles: list[Optional[WorkerGroup]]) -> RolloutGroup:
    """The rollout engines of a controller that started `roles` before them (None entries skipped).

    On CPU every actor starts side by side. On CUDA the engines size their KV cache from the memory free
    when they start (vLLM's gpu_memory_utilization), so they start after the other roles' actors are up
    (their CUDA contexts taken); RolloutGroup then waits for them, before any role loads its weights
    (call init_model after this)."""
    if cfg.cluster.device == "cuda":
        for group in roles:
            if group is not None:
                group.ready()
    return RolloutGroup(model_path, cfg.model, cfg.rollout, cfg.cluster, seed=cfg.run.seed)


def connect_weight_sync(policy: WorkerGroup, rollout: RolloutGroup, cluster: ClusterConfig) -> dict[str, str]:
    """Join the policy's rank 0 and every engine in one weight-sync group (call after init_model).

    The transport follows `cluster.weight_sync_transport` (shared memory when every engine is on the
    trainer's Ray node and the device is cpu, under auto). Calling it again re-forms the group (every
    member leaves its old one first). Returns {"transport": what rank 0 chose, "backend": ...}.
    """
    host, port = policy.call(PolicyWorker.free_address)
    backend, transport = weight_sync_backend(cluster), weight_sync_transport(cluster)
    sender = policy.run(PolicyWorker.init_weight_sync, host, port, 1 + rollout.num_ranks, backend, transport)
    receivers = rollout.init_weight_sync_async(host, port, backend, cluster.collective_timeout_s)
    chosen, _ = wait_all([(policy, sender), (rollout.group, receivers)])
    logger.info("weight sync: %s over %s (asked: %s)", chosen, backend, transport)
    return {"transport": chosen, "backend": backend}


def check_shared_output_dir(output_dir: Path, writers: dict[str, Optional[WorkerGroup]]) -> None:
    """ConfigError unless every rank of the `writers` groups reads a marker the driver writes under output_dir.

    A checkpoint is written by every DeepSpeed rank (its own shards) into a directory the driver then
    completes and renames, and final/ by rank 0: on storage that only some nodes see, each node would
    keep its own part, the renamed checkpoint would lack the others' shards and resume would fail (or
    load a stale local copy). One small file and one call per group at start-up catch that before step 1.
    """
    directory = Path(output_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = directory / f".rlhf-shared-check-{token[:12]}"
    marker.write_text(token, encoding="utf-8")
    try:
        blind = []
        for role, group in writers.items():
            if group is None:
                continue
            seen = group.call(Worker.read_text, str(marker))
            if any(text != token for text in seen):
                where = group.ping()
                blind += [
                    f"{role} rank {r} (node {where[r]['node_ip']})" for r, text in enumerate(seen) if text != token
                ]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise ConfigError(
            f"run.output_dir {directory} is not on a filesystem every node sees: {', '.join(blind)} cannot read "
            f"{marker.name} that the driver wrote there on node {node_ip()}. Every trained rank writes its "
            f"checkpoint shards and rank 0 the final model into run.output_dir, so it must be one directory "
            f"for all nodes: set run.output_dir to an absolute path on shared storage (NFS, Lustre, a mounted "
            f"bucket) that every node mounts at the same path"
        )


def write_placement(
    output_dir: Path, groups: dict[str, Optional[WorkerGroup]], weight_sync: Optional[dict[str, str]] = None
) -> dict[str, Any]:
    """Record the cluster's nodes and every rank's node in <output_dir>/placement.json; log one line per role.

    Returns what it wrote: {"driver_node_id", "nodes": {node_id: {"ip", "resources"}}, "roles": {role:
    [{"rank", "node_id", "node_ip", "pid"}]}, "weight_sync": {"transport", "backend"} or None}.
    """
    import ray

    nodes = {
        n["NodeID"]: {"ip": n["NodeManagerAddress"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]
    }
    roles = {}
    for role, group in groups.items():
        if group is not None:
            roles[role] = [{k: r[k] for k in ("rank", "node_id", "node_ip", "pid")} for r in group.ping()]
    layout = {"driver_node_id": node_id(), "nodes": nodes, "roles": roles, "weight_sync": weight_sync}
    write_json_atomic(Path(output_dir) / PLACEMENT_FILE, layout)
    for role, ranks in roles.items():
        by_node: dict[str, list[int]] = {}
        for r in ranks:
            by_node.setdefault(f"{r['node_id'][:8]} ({r['node_ip']})", []).append(r["rank"])
        logger.info("placement: %s ranks %s", role, "; ".join(f"{rs} on node {n}" for n, rs in by_node.items()))
    return layout


def sync_weights(policy: WorkerGroup, rollout: RolloutGroup, bucket_mb: int) -> dict[str, float]:
    """Stream the policy's current weights into every rollout engine (bucketed, one collective).

    Sender and receivers are awaited together, so a death on either side raises at once (an
    engine's death before the sender's resulting WeightSyncError). Returns the sender's
    `weight_sync/...` stats (seconds, MiB, tensors, buckets).
    """
    # the engines first: on shared memory rank 0 starts writing once every engine waits for the stream
    receivers = rollout.receive_weights_async()
    sender = policy.run(PolicyWorker.sync_weights, bucket_mb)
    stats, received = wait_all([(policy, sender), (rollout.group, receivers)])
    stats = dict(stats or {})
    start = time.perf_counter()
    check_loaded_weights(stats.pop("checksums"), received)
    stats["timing/sync_check"] = time.perf_counter() - start  # inside timing/sync
    return stats


def check_loaded_weights(sent: Checksums, received: list[dict[str, Any]]) -> None:
    """WeightSyncError naming the tensors unless every engine loaded exactly what rank 0 sent (per-tensor checksums,
    rlhf.engines.checksum): a sync that ends without an error but leaves an engine on other weights would have the
    engines sample from a policy the trainer does not train."""
    for rank, answer in enumerate(received):
        differ, missing, extra = differences(sent, answer["checksums"])
        if not (differ or missing or extra):
            continue
        side = "loaded" if answer["read_back"] else "received"
        problems = []
        if differ:
            problems.append(f"{len(differ)} tensor(s) {side} with other bytes than sent: {describe(differ)}")
        if missing:
            problems.append(f"{len(missing)} sent but not in the engine's model: {describe(missing)}")
        if extra:
            problems.append(f"{len(extra)} {side} but never sent: {describe(extra)}")
        raise WeightSyncError(
            f"weight sync: rollout engine {rank} holds other weights than the policy sent ({'; '.join(problems)}). "
            "It would sample from a policy the trainer does not train. A corrupted transfer (shared memory written "
            "while read, a broken link) or a loader that drops, renames or transposes tensors; an adapter must "
            "reach the engines merged into the base weights under their checkpoint names"
        )


class RolloutSupervisor:
    """The rollout engines as the controller calls them: a dead engine is restarted and the call retried, and
    with rollout.enable_sleep the engines sleep between rollouts (`RolloutGroup.memory`: awake for each
    generate, asleep after it, weights woken for each sync), so no trainer branches on it.

    Design: the dead engine is recreated exactly as it was built (`WorkerGroup.restart`: same
    bundle, environment and constructor arguments), so it comes up with the checkpoint's weights
    and in no weight-sync group. The group is then re-formed for every engine (a collective group
    cannot admit a new member; re-forming reuses the one join path that is tested everywhere) and
    the policy's current weights are pushed to all engines, after which the failed generate or
    sync is retried. Surviving engines receive weights they already hold: a restart costs one
    extra sync and needs no weight snapshot on disk.

    Engines are pinged before each sync, so one that died while idle (during scoring or the
    update) is replaced before the trainer starts sending. One that dies inside the sync delays
    recovery by up to cluster.collective_timeout_s (the trainer's send has to time out before it
    can join the new group). Restarts are counted over the run (`faults/rollout_restarts`, and the generate calls
    lost with an engine and generated again, `faults/rollout_requests_regenerated`); the
    death after `max_restarts` restarts raises WorkerDiedError.
    """

    def __init__(
        self,
        rollout: RolloutGroup,
        policy: WorkerGroup,
        cluster: ClusterConfig,
        *,
        bucket_mb: int,
        max_restarts: int,
        policy_version: Callable[[], int] = lambda: 0,
    ) -> None:
        """`policy_version`: the policy's version now (updates applied), read at every push of its weights."""
        self.rollout = rollout
        self.policy = policy
        self.cluster = cluster
        self.bucket_mb = bucket_mb
        self.max_restarts = max_restarts
        self.policy_version = policy_version
        self.version = policy_version()
        """The policy version of the weights the engines hold: set at every push of the policy's weights."""
        self.restarts = 0
        """Engines restarted so far in this run."""
        self.regenerated = 0
        """Generate calls lost with a dead engine and generated again, so far in this run."""
        self._stale = False  # restarted engines are outside the weight-sync group and hold old weights

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, n: int, seed: Optional[int] = None
    ) -> list[list[Generation]]:
        """`RolloutGroup.generate`, retried on fresh engines (with the current weights) if one dies; the
        engines are awake for it and, with rollout.enable_sleep, asleep after it (`RolloutGroup.memory`)."""
        return self.wait(self.generate_async(prompt_token_ids, sampling, n, seed))

    def generate_async(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, n: int, seed: Optional[int] = None
    ) -> PendingGeneration:
        """Start `generate` and return at once (the policy trains meanwhile); `wait` for the outputs. The policy
        must not sync (or restart engines) before then: the engines are busy."""

        def start() -> Any:
            self.rollout.memory.before_generate()
            return self.rollout.generate_async(prompt_token_ids, sampling, n, seed)

        pending = self._call(start, is_sync=False)
        return PendingGeneration(pending, (prompt_token_ids, sampling, n, seed), self.version, self.restarts)

    def wait(self, job: PendingGeneration) -> list[list[Generation]]:
        """The outputs of `generate_async`. An engine that died meanwhile is restarted and the whole job generated
        again with the policy's current weights (its prompts re-queued, none lost; `job.version` says so). Call it
        with no update in flight: the restart pushes the policy's weights and tags them with its version."""
        try:
            outputs = self.rollout.wait(job.pending)
        except WorkerDiedError as error:
            if error.role != self.rollout.role:
                raise
            if job.restarts == self.restarts:  # else the engine was already replaced, for another job sent with it
                self._restart_dead(error)
            outputs = self.generate(*job.args)
            self.regenerated += 1
            job.version = self.version
            return outputs
        self.rollout.memory.after_generate()
        return outputs

    def generate_unsupervised(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, n: int, seed: Optional[int] = None
    ) -> list[list[Generation]]:
        """`RolloutGroup.generate` that restarts nothing: a dead engine's WorkerDiedError goes to the caller, which
        passes it to `recover` once no update is in flight. For a driver thread that generates while the policy
        trains (multi-turn rollouts, rlhf.trainers.agent), where a restart's weight push would race the update."""
        self.rollout.memory.before_generate()
        outputs = self.rollout.generate(prompt_token_ids, sampling, n, seed)
        self.rollout.memory.after_generate()
        return outputs

    def recover(self, error: WorkerDiedError, restarts_then: int) -> None:
        """After `generate_unsupervised` failed: restart the dead engines and push the policy's weights to all now
        (call it with no update in flight); the caller generates its lost work again. `restarts_then`: `restarts`
        when the failed work was sent; a restart since then already replaced the engine (for other work lost with
        it)."""
        if error.role != self.rollout.role:
            raise error
        if restarts_then == self.restarts:
            self._restart_dead(error)
        self.regenerated += 1
        self._call(lambda: None, is_sync=False)  # re-forms the weight-sync group and pushes the weights

    def sync(self) -> dict[str, float]:
        """`sync_weights` into every engine, replacing engines found dead first."""
        return self._call(self._sync_live_engines, is_sync=True)

    def metrics(self) -> dict[str, float]:
        return {
            "faults/rollout_restarts": float(self.restarts),
            "faults/rollout_requests_regenerated": float(self.regenerated),
        }

    # -- internals ----------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], *, is_sync: bool) -> T:
        while True:
            try:
                if self._stale:
                    connect_weight_sync(self.policy, self.rollout, self.cluster)
                    if not is_sync:  # a sync call pushes the weights itself
                        self.rollout.memory.before_sync()
                        sync_weights(self.policy, self.rollout, self.bucket_mb)
                        self.version = self.policy_version()
                    self._stale = False
                return fn()
            except WorkerDiedError as error:
                if error.role != self.rollout.role:
                    raise
                self._restart_dead(error)

    def _sync_live_engines(self) -> dict[str, float]:
        dead = self.rollout.group.dead_ranks()
        if dead:
            raise WorkerDiedError(self.rollout.role, dead[0], "engine found dead before the weight sync")
        self.rollout.memory.before_sync()
        stats = sync_weights(self.policy, self.rollout, self.bucket_mb)
        self.version = self.policy_version()
        return stats

    def _restart_dead(self, error: WorkerDiedError) -> None:
        dead = self.rollout.group.dead_ranks()
        if not dead:  # the engine that failed the call answers a ping: nothing to restart, do not hide it
            raise error
        if self.restarts + len(dead) > self.max_restarts:
            raise WorkerDiedError(
                error.role,
                dead[0],
                f"{error.reason}; engines {dead} are dead and {self.restarts} restarts were already made, the most "
                f"rollout.max_restarts={self.max_restarts} allows (raise it, or find the cause in the engine's log: "
                f"out of memory?)",
                error.remote_traceback,
            ) from error
        for rank in dead:
            logger.warning("rollout engine %d died (%s); restarting it", rank, error.reason)
            self.rollout.group.restart(rank)
            self.restarts += 1
        self._stale = True


@dataclass
class PendingGeneration:
    """A generate call in flight on the engines (RolloutSupervisor.generate_async)."""

    pending: Any
    args: tuple[Any, ...]
    """generate's arguments, to run it again on restarted engines."""
    version: int
    """The policy version of the weights that generate (RolloutSupervisor.version when it started)."""
    restarts: int = 0
    """RolloutSupervisor.restarts when it started: a later restart replaced the engines it was sent to."""


@contextmanager
def stop_on_dead_rank(checkpoints: CheckpointManager) -> Iterator[None]:
    """A dead rank that reaches the controller (a trained, reference or reward rank, or a rollout
    engine past its restarts) becomes RunStoppedError naming the newest complete checkpoint;
    the caller's `close()` then shuts the remaining actors down."""
    try:
        yield
    except WorkerDiedError as error:
        latest = checkpoints.latest()
        raise RunStoppedError(error.role, error.rank, error.reason, str(latest) if latest else None) from error
