"""Role plumbing shared by the controllers: start a worker group, wire and run the policy→rollout weight sync."""

from __future__ import annotations

from typing import Any

from rlhf.config import ClusterConfig, ResourceConfig, weight_sync_backend
from rlhf.utils.ray_session import runtime_env_vars
from rlhf.workers.group import WorkerGroup
from rlhf.workers.policy import PolicyWorker
from rlhf.workers.rollout import RolloutGroup


def start_group(
    cluster: ClusterConfig, worker_cls: type, role: str, num_workers: int, resources: ResourceConfig, **init_kwargs: Any
) -> WorkerGroup:
    """`num_workers` actors of `worker_cls` placed and configured by the cluster preset."""
    return WorkerGroup(
        worker_cls,
        role=role,
        num_workers=num_workers,
        resources=resources,
        placement_strategy=cluster.placement_strategy,
        init_kwargs=init_kwargs,
        env_vars=runtime_env_vars(cluster),
        device=cluster.device,
        threads_per_worker=cluster.threads_per_worker,
    )


def connect_weight_sync(policy: WorkerGroup, rollout: RolloutGroup, cluster: ClusterConfig) -> None:
    """Join the policy's rank 0 and every engine in one weight-sync group (call after init_model)."""
    host, port = policy.call(PolicyWorker.free_address)
    backend = weight_sync_backend(cluster)
    sender = policy.run(PolicyWorker.init_weight_sync, host, port, 1 + rollout.num_ranks, backend)
    rollout.init_weight_sync(host, port, backend, cluster.collective_timeout_s)
    policy.wait(sender)


def sync_weights(policy: WorkerGroup, rollout: RolloutGroup, bucket_mb: int) -> dict[str, float]:
    """Stream the policy's current weights into every rollout engine (bucketed, one collective).

    Returns the sender's `weight_sync/...` stats (seconds, MiB, tensors, buckets).
    """
    sender = policy.run(PolicyWorker.sync_weights, bucket_mb)
    receivers = rollout.receive_weights_async()
    stats = policy.wait(sender)
    rollout.wait(receivers)
    return dict(stats or {})
